"""Every projector with every optimizer class, in every weight dtype and state precision,
across several subspace refreshes (hardening issue, points 1 and 2).

Before the fix, re-projecting moments at a refresh multiplied float32 moments by a bf16 or
fp16 basis and crashed (``expected m1 and m2 to have the same dtype``): Flora at its first
resample, DCT with ``rotate_subspace=True`` at its first refresh. Online Subspace Descent
kept its basis's AdamW moments in fp16 and turned NaN within a few steps.
"""

import pytest
import torch
from optim_db import DTYPES, OPTIMIZERS, PROJECTORS

from subspace_optim.optim.moments import MIN_8BIT_SIZE

COMBINATIONS = [
    (o, p, v) for o, rec in OPTIMIZERS.items() for p, prec in PROJECTORS.items()
    if rec.any_projector or p == "flora" for v in prec.variants
]


def _stored_dtype(bits, dtype, numel):
    if bits == 8:
        return torch.uint8 if numel >= MIN_8BIT_SIZE else torch.float32
    return {None: dtype, 32: torch.float32, 16: torch.bfloat16}[bits]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("opt_name,proj,variant", COMBINATIONS,
                         ids=[f"{o}-{p}-{v}" for o, p, v in COMBINATIONS])
def test_refreshes_work_in_every_dtype_and_state_precision(opt_name, proj, variant, dtype):
    """A wide and a tall matrix (both sides) at rank 32, whose moments (32 x 128, 128 x 32)
    are large enough to be stored in 8 bits, and a bias at full rank; refreshes at steps 0,
    2 and 4 (Flora resamples at 2 and 4)."""
    record, projector = OPTIMIZERS[opt_name], PROJECTORS[proj]
    for bits in record.state_bits:
        if bits == 8:
            pytest.importorskip("bitsandbytes")
        torch.manual_seed(0)
        wide = torch.nn.Parameter(torch.randn(64, 128, dtype=dtype))
        tall = torch.nn.Parameter(torch.randn(128, 64, dtype=dtype))
        bias = torch.nn.Parameter(torch.randn(64, dtype=dtype))
        params = (wide, tall, bias)
        groups = [{"params": [bias]},
                  {"params": [wide, tall], "rank": 32, "update_proj_gap": 2,
                   **projector.group(variant)}]
        if variant in projector.needs_lr and not record.has_lr:
            with pytest.raises(ValueError, match="osd_variant: 'paper'"):
                record.make(groups, state_bits=bits)
            continue
        opt = record.make(groups, state_bits=bits, **record.eps_for(dtype))
        before = [p.detach().clone() for p in params]
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p, old in zip(params, before, strict=True):
            assert p.dtype == dtype
            assert bool(torch.isfinite(p).all()), (bits, tuple(p.shape))
            assert not torch.equal(p, old), (bits, tuple(p.shape))
        if record.any_projector:  # FloraAdafactor keeps its own precision (state_bits None)
            for p in params:
                for key, moment in opt.state[p].items():
                    if key.startswith("exp_avg") and not key.endswith("_absmax"):
                        expected = _stored_dtype(bits, dtype, moment.numel())
                        assert moment.dtype == expected, (bits, key, moment.dtype)


def test_online_pca_in_fp16_stays_finite():
    """The issue's probe: fp16 weights, eps 1e-4, state_bits=32, NaN within 6 steps before
    (the basis's own AdamW kept fp16 moments with eps 1e-8). 20 steps here."""
    import subspace_optim as so

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128, dtype=torch.float16))
    opt = so.OnlineSubspaceAdamW([{"params": [w], "rank": 16}], lr=1e-3, eps=1e-4,
                                 state_bits=32)
    for _ in range(20):
        w.grad = torch.randn_like(w)
        opt.step()
    state = opt.state[w]
    assert state["proj_exp_avg"].dtype == state["proj_exp_avg_sq"].dtype == torch.float32
    assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(state["proj_basis"]).all())
