"""The optimizers with the Triton kernels (SUBSPACE_OPTIM_KERNELS=triton; Triton's
interpreter without a GPU): 5 steps launch the kernels and are as accurate as the same 5
steps with SUBSPACE_OPTIM_KERNELS=torch.

The loss is linear in each layer's output, so a weight's gradient does not depend on the
weights: every run sees the same gradients (and so the same refreshed bases) at every step.
The rule is the one of tests/test_kernels.py for reduced precision, applied to the whole
run: against the same run in float64 with the PyTorch ops, the kernels' error is at most
twice the fp32 PyTorch path's error, plus the rounding of the last steps' updates
(``5 * (rank + 4) * 2**-24`` of the weight's scale: each element of an update is a chain
of at most ``rank + 4`` fp32 operations). Comparing the two fp32 runs with each other
instead would measure Adam's sensitivity, not the kernels: where a projected gradient is
near zero, a rounding difference in it becomes a difference of order one in the
normalised direction m / sqrt(v), in both paths alike, and 8-bit moments near a midpoint of
the map round to neighbouring codes. The moments (32 x 192, 160 x 32) are large enough to
be stored in 8 bits."""

import pytest
import torch

pytest.importorskip("triton")

from subspace_optim.kernels import registry  # noqa: E402, F401

import subspace_optim as so  # noqa: E402
from subspace_optim import ops  # noqa: E402
from subspace_optim.nn import quantize_linear_layers  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

QGALORE = {"quant_group_size": 64}
RANK, STEPS = 32, 5
TOLERANCE = STEPS * (RANK + 4) * 2.0**-24

# name -> (class, group keys, INT8 weights, the ops whose kernels must run)
CASES = {
    "GaLoreAdamW": (so.GaLoreAdamW, {}, False, {"projected_adamw_update"}),
    "GaLoreAdamW8bit": (so.GaLoreAdamW8bit, {}, False, {"blockwise8_adamw_update"}),
    "QGaLoreAdamW": (so.QGaLoreAdamW, QGALORE, False,
                     {"int4_project", "int4_project_back_"}),
    "QGaLoreAdamW8bit-int8": (so.QGaLoreAdamW8bit, QGALORE, True,
                              {"int4_project", "blockwise8_adamw_update", "int8_sr_store_"}),
    "GrassAdamW": (so.GrassAdamW, {}, False, {"grass_gather", "grass_scatter_update_"}),
    # No resample in the 5 steps: after one, the moved second moment is near zero in some
    # coordinates, where Adam turns the rounding of either fp32 path into differences 10x
    # above the others' (measured: 2e-5 to 2e-4 of the weight's scale, varying from step to
    # step with no order between the paths); the kernels are the same with the new key.
    "FloraAdamW": (so.FloraAdamW, {"update_proj_gap": 200}, False,
                   {"flora_project", "flora_project_back_"}),
}


def _model(int8, dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(192, 128), torch.nn.Identity(),
                                torch.nn.Linear(128, 160)).to(DEVICE, dtype)
    if int8:
        quantize_linear_layers(model, [r"^0$"])
    return model


def _train(name, monkeypatch, setting, dtype=torch.float32):
    cls, keys, int8, _ = CASES[name]
    monkeypatch.setenv("SUBSPACE_OPTIM_KERNELS", setting)
    model = _model(int8, dtype)
    matrices = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    needs_bnb = "8bit" in name
    if needs_bnb:
        pytest.importorskip("bitsandbytes")
    opt = cls([{"params": others},
               {"params": matrices, "rank": RANK, "update_proj_gap": 2, **keys}], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):  # refreshes at 0, 2, 4 (Flora resamples at 2 and 4)
        opt.zero_grad()
        _linear_loss(model, gen, dtype).backward()
        opt.step()
    return [t.detach().clone() for t in model.state_dict().values()]


def _linear_loss(model, gen, dtype):
    """Linear in each layer's output: the weights' gradients are y^T x, whatever the
    weights."""
    x0, x2, y0, y2 = (torch.randn(128, n, generator=gen).to(DEVICE, dtype)
                      for n in (192, 128, 128, 160))
    return ((model[0](x0) * y0).sum() + (model[2](x2) * y2).sum()) / 128


@pytest.mark.parametrize("name", CASES)
def test_triton_kernels_run_and_match_the_pytorch_path(name, monkeypatch):
    launched = set()
    for op in CASES[name][3]:
        kernel = ops._TRITON[op]

        def counting(*args, _op=op, _kernel=kernel):
            launched.add(_op)
            return _kernel(*args)

        monkeypatch.setitem(ops._TRITON, op, counting)
    triton_run = _train(name, monkeypatch, "triton")
    assert launched == CASES[name][3]
    torch_run = _train(name, monkeypatch, "torch")
    exact = _train(name, monkeypatch, "torch", torch.float64)
    for ours, theirs, reference in zip(triton_run, torch_run, exact, strict=True):
        if ours.dtype == torch.uint8:  # INT8 codes: compared through the float weights
            continue
        scale = reference.abs().max().item()
        kernel_error = (ours.double() - reference).abs().max().item()
        torch_error = (theirs.double() - reference).abs().max().item()
        assert kernel_error <= 2 * torch_error + TOLERANCE * scale, (kernel_error,
                                                                     torch_error, scale)
    moved = [t for t in torch_run if t.is_floating_point()]
    assert moved and all(torch.isfinite(t).all() for t in moved)


def test_int8_weights_agree_through_the_dequantised_weight(monkeypatch):
    """The INT8 layer's dequantised weight after 5 steps. The same counter-based draws round
    both runs alike, except where the float weight before rounding sits within rounding
    error of a draw's threshold: there the runs land one grid step apart. The chance is about
    the rounding error over the grid step (1e-5 per element and step here, so about one of
    the 24576 x 5 roundings), so the rule is: every element within 1e-4 of the weight's
    scale, but for at most 0.1% of elements that differ by one grid step."""
    pytest.importorskip("bitsandbytes")
    runs, steps = {}, {}
    for setting in ("triton", "torch"):
        monkeypatch.setenv("SUBSPACE_OPTIM_KERNELS", setting)
        model = _model(True)
        opt = so.QGaLoreAdamW8bit([{"params": [model[0].bias, model[2].bias]},
                                   {"params": [model[0].weight, model[2].weight], "rank": 32,
                                    **QGALORE}], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(128, 192, generator=gen).to(DEVICE)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        runs[setting] = model[0].dequantized_weight()
        steps[setting] = model[0].weight_scales.max()
    diff = (runs["triton"] - runs["torch"]).abs()
    flipped = diff > 1e-4 * runs["torch"].abs().max()
    assert flipped.float().mean() <= 1e-3
    assert (diff[flipped] <= steps["torch"] * (1 + 1e-4)).all()
