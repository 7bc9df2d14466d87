"""skip_nonfinite (hardening issue, point 7): a parameter whose gradient has a NaN or an inf
is not updated and its state is not touched; without the option (torch's convention) one
bad gradient poisons the moments for good."""

import copy

import pytest
import torch
from optim_db import OPTIMIZERS

import subspace_optim as so


def _params():
    torch.manual_seed(0)
    return (torch.nn.Parameter(torch.randn(24, 32)), torch.nn.Parameter(torch.randn(32, 24)),
            torch.nn.Parameter(torch.randn(24)))


def _build(record, params, **kwargs):
    wide, tall, bias = params
    return record.make([{"params": [bias]},
                        {"params": [wide, tall], "rank": 4, "update_proj_gap": 2}], **kwargs)


def _grads(params, step):
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _snapshot(opt, p):
    return copy.deepcopy(opt.state[p])


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_nonfinite_gradient_leaves_its_parameter_and_state_untouched(name):
    record = OPTIMIZERS[name]
    if record.bnb:
        pytest.importorskip("bitsandbytes")
    params = _params()
    opt = _build(record, params, skip_nonfinite=True)
    for step in range(3):  # crosses a refresh at step 2
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        opt.step()
    wide, tall, bias = params
    frozen = {id(p): (p.detach().clone(), _snapshot(opt, p)) for p in (wide, bias)}
    moved = tall.detach().clone()
    grads = _grads(params, 3)
    grads[0][3, 5] = float("nan")
    grads[2][7] = float("inf")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    for p in (wide, bias):
        value, state = frozen[id(p)]
        assert torch.equal(p, value)
        _assert_state_equal(opt.state[p], state)
    assert not torch.equal(tall, moved)  # the finite parameter still stepped
    assert opt.nonfinite_skips == 2
    for step in range(4, 8):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert opt.state[tall]["step"] == 8 and opt.state[wide]["step"] == 7


def test_without_the_option_a_nan_poisons_the_moments_as_in_torch():
    params = _params()
    opt = _build(OPTIMIZERS["SubspaceAdamW"], params)
    grads = _grads(params, 0)
    grads[2][0] = float("nan")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    assert torch.isnan(opt.state[params[2]]["exp_avg"]).any()


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _layer_groups(model):
    mats = [p for p in model.parameters() if p.dim() == 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": vecs}, {"params": mats, "rank": 2, "update_proj_gap": 2}]


def test_layerwise_a_nonfinite_micro_batch_skips_its_window_and_clipping_recovers():
    """k=2: a NaN in the first micro-batch spoils the window (no refresh from it, no step);
    the NaN total norm is reported but does not become the global clipping reference."""
    model = _tiny()
    opt = so.GaLoreAdamW(_layer_groups(model), lr=1e-2, skip_nonfinite=True)
    handle = so.step_in_backward(opt, 2, max_grad_norm=0.1)
    gen = torch.Generator().manual_seed(0)

    def step(poison=False):
        for micro in range(2):
            x = torch.randn(4, 8, generator=gen)
            if poison and micro == 0:
                x[0, 0] = float("nan")
            model(x).pow(2).mean().backward()
        opt.step()

    for _ in range(3):
        step()
    reference = handle.clip_norm.clone()
    weights = [p.detach().clone() for p in model.parameters()]
    states = [_snapshot(opt, p) for p in model.parameters()]
    step(poison=True)
    assert torch.isnan(handle.grad_norm)
    assert torch.equal(handle.clip_norm, reference)
    for p, w, state in zip(model.parameters(), weights, states, strict=True):
        assert torch.equal(p, w)
        _assert_state_equal({k: v for k, v in opt.state[p].items() if k != "micro_step"},
                            {k: v for k, v in state.items() if k != "micro_step"})
    step()
    assert torch.isfinite(handle.clip_norm) and not torch.equal(handle.clip_norm, reference)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not any(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    handle.remove()


def _huge_run(record, magnitude, **group):
    torch.manual_seed(0)
    params = (torch.nn.Parameter(torch.randn(24, 32)), torch.nn.Parameter(torch.randn(32, 24)),
              torch.nn.Parameter(torch.randn(24)))
    wide, tall, bias = params
    opt = record.make([{"params": [bias]},
                       {"params": [wide, tall], "rank": 4, "update_proj_gap": 1, **group}])
    for step in range(4):  # a refresh (and Flora's resample) at every step
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g * magnitude
        opt.step()
    return all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finite_but_huge_gradients_leave_the_weights_finite(name):
    """Gradients of 1e30 (finite in float32) keep every weight finite, as torch's AdamW
    does (issue 19, point 6: Grass's multinomial selection squared them into inf
    probabilities at 1e19, Flora's resample moved an inf second moment into NaN at 1e25).
    Adafactor's rules square the gradient as torch.optim.Adafactor does, which is NaN from
    1e19: they are held to torch's range, 1e18."""
    record = OPTIMIZERS[name]
    if record.bnb:
        pytest.importorskip("bitsandbytes")
    if record.rule in ("adafactor", "flora_adafactor"):
        assert _huge_run(record, 1e18)
        w = torch.nn.Parameter(torch.randn(24, 32))
        reference = torch.optim.Adafactor([w], lr=1e-2)
        w.grad = torch.randn(24, 32) * 1e19
        reference.step()
        assert not torch.isfinite(w).all()  # torch's own range ends there
        return
    assert _huge_run(record, 1e30)
    if name == "GrassAdamW":
        for selection in ("topk", "uniform"):
            assert _huge_run(record, 1e30, selection=selection)
