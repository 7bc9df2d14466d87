"""SubspaceAdamW without projection is torch.optim.AdamW; the rule matches its reference."""

import pytest
import torch
from references import adamw_reference, gradient_stream

from subspace_optim import SubspaceAdamW

# fp32 over 50 chained steps: 1e-6 absolute, the bound the issue sets; the two
# implementations differ only in rounding (lerp vs mul-add, division order).
ATOL = 1e-6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5), torch.nn.LayerNorm(5)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        {"lr": 1e-2, "weight_decay": 0.0},
    ],
    ids=["defaults", "custom", "no-decay"],
)
def test_matches_torch_adamw_on_an_mlp(kwargs):
    """50 steps on a real loss: same parameters as torch.optim.AdamW within 1e-6."""
    ours, theirs = _model(), _model()
    opt_ours = SubspaceAdamW(ours.parameters(), **kwargs)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), **kwargs)
    data = torch.randn(50, 16, 12)
    target = torch.randn(50, 16, 5)
    for x, y in zip(data, target, strict=True):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_rule_matches_readable_reference():
    w0 = torch.randn(7, 3)
    grads = gradient_stream((7, 3), 50, seed=1)
    hp = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05}
    p = torch.nn.Parameter(w0.clone())
    opt = SubspaceAdamW([p], **hp)
    for g in grads:
        p.grad = g
        opt.step()
    torch.testing.assert_close(p.detach(), adamw_reference(w0, grads, **hp), atol=ATOL, rtol=0)


def test_without_bias_correction_matches_reference():
    w0 = torch.randn(7, 3)
    grads = gradient_stream((7, 3), 50, seed=2)
    hp = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05}
    p = torch.nn.Parameter(w0.clone())
    opt = SubspaceAdamW([p], correct_bias=False, **hp)
    for g in grads:
        p.grad = g
        opt.step()
    ref = adamw_reference(w0, grads, correct_bias=False, **hp)
    torch.testing.assert_close(p.detach(), ref, atol=ATOL, rtol=0)
    biased = adamw_reference(w0, grads, **hp)
    assert (ref - biased).abs().max() > 100 * ATOL  # the flag changes the result


def test_zero_size_and_scalar_parameters():
    """Edge shapes torch's own optimizer tests use: an empty and a 0-d parameter."""
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    scalar = torch.nn.Parameter(torch.tensor(1.0))
    opt = SubspaceAdamW([empty, scalar], lr=0.1)
    empty.grad = torch.zeros(0, 4)
    scalar.grad = torch.tensor(2.0)
    opt.step()
    assert scalar.item() < 1.0
    assert opt.state[empty]["exp_avg"].shape == (0, 4)
