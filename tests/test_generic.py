"""Generic tests over the registry (tests/optim_db.py): every optimizer class with every
projector it can use, on odd shapes, with a gradient missing mid-run."""

import copy

import pytest
import torch
from optim_db import OPTIMIZERS, PROJECTORS

COMBINATIONS = [(o, p) for o, rec in OPTIMIZERS.items() for p in PROJECTORS
                if rec.any_projector or p == "flora"]
IDS = [f"{o}-{p}" for o, p in COMBINATIONS]

# name -> (shape, rank): a row, a column, rank equal to the smaller dimension, a 3-D tensor
# (projected as 4 x 15) and an empty matrix (never projected).
ODD = {"1xN": ((1, 17), 1), "Nx1": ((17, 1), 1), "rank=min": ((6, 9), 6),
       "3-D": ((4, 3, 5), 3), "empty": ((0, 7), 1)}


def _groups(params, projector, ranks):
    record = PROJECTORS[projector]
    return [{"params": [p], "rank": r, "update_proj_gap": 2, **record.group()}
            for p, r in zip(params, ranks, strict=True)]


@pytest.mark.parametrize("name,projector", COMBINATIONS, ids=IDS)
def test_odd_shapes(name, projector):
    record = OPTIMIZERS[name]
    if record.bnb:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape, _ in ODD.values()]
    opt = record.make(_groups(params, projector, [r for _, r in ODD.values()]))
    before = [p.detach().clone() for p in params]
    for _ in range(5):  # refreshes at 0, 2, 4
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for (label, _), p, old in zip(ODD.items(), params, before, strict=True):
        assert bool(torch.isfinite(p).all()), label
        if p.numel():
            assert not torch.equal(p, old), label
        assert opt.state[p]["step"] == 5, label


@pytest.mark.parametrize("name,projector", COMBINATIONS, ids=IDS)
def test_a_gradient_missing_mid_run_leaves_its_parameter_and_state_alone(name, projector):
    record = OPTIMIZERS[name]
    if record.bnb:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w, frozen = torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(12, 20))
    opt = record.make(_groups([w, frozen], projector, [4, 4]))
    for step in range(6):
        w.grad = torch.randn_like(w)
        frozen.grad = None if step in (2, 3) else torch.randn_like(frozen)
        if step == 2:
            value, state = frozen.detach().clone(), copy.deepcopy(opt.state[frozen])
        opt.step()
        if step == 3:
            assert torch.equal(frozen, value)
            assert opt.state[frozen].keys() == state.keys()
            for key, v in state.items():
                assert torch.equal(opt.state[frozen][key], v) if torch.is_tensor(v) else \
                    opt.state[frozen][key] == v, key
    assert opt.state[w]["step"] == 6 and opt.state[frozen]["step"] == 4
