"""Properties of GaLore's SVD projector, and what it does when the SVD fails."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from subspace_optim import GaLoreAdamW
from subspace_optim.projectors import SVDProjector, get_projector, resolve_side

PROJ = get_projector("galore")
# Backward-stable SVD: errors grow like (matrix size) x machine epsilon; 10x slack.
EPS32 = torch.finfo(torch.float32).eps


def _tol(m, n):
    return 10 * max(m, n) * EPS32


@st.composite
def gradients(draw):
    m = draw(st.integers(1, 24))
    n = draw(st.integers(1, 24))
    rank = draw(st.integers(1, min(m, n)))
    proj_type = draw(st.sampled_from(["std", "reverse_std", "left", "right"]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * scale
    return g, rank, resolve_side((m, n), proj_type)


def _refreshed(g, rank, side):
    state = {}
    PROJ.refresh(state, {"rank": rank}, g, side)
    return PROJ.basis(state, {"rank": rank}, g, side)


@settings(max_examples=60, deadline=None)
@given(gradients())
def test_basis_is_orthonormal(case):
    g, rank, side = case
    b = _refreshed(g, rank, side)
    gram = b @ b.T if side == "right" else b.T @ b
    torch.testing.assert_close(gram, torch.eye(rank), atol=_tol(*g.shape), rtol=0)


@settings(max_examples=60, deadline=None)
@given(gradients())
def test_projection_is_idempotent(case):
    g, rank, side = case
    b = _refreshed(g, rank, side)
    once = PROJ.project_back(b, PROJ.project(b, g, side), side)
    twice = PROJ.project_back(b, PROJ.project(b, once, side), side)
    torch.testing.assert_close(twice, once, atol=_tol(*g.shape) * g.abs().max().item(), rtol=0)


@settings(max_examples=60, deadline=None)
@given(gradients())
def test_projection_never_increases_the_norm(case):
    g, rank, side = case
    b = _refreshed(g, rank, side)
    back = PROJ.project_back(b, PROJ.project(b, g, side), side)
    assert back.norm() <= g.norm() * (1 + _tol(*g.shape))


def test_svd_basis_spans_the_top_singular_subspace():
    """Projecting a rank-r matrix onto its own rank-r basis loses nothing."""
    g = torch.randn(20, 4) @ torch.randn(4, 12)
    for side in ("left", "right"):
        b = _refreshed(g, 4, side)
        back = PROJ.project_back(b, PROJ.project(b, g, side), side)
        torch.testing.assert_close(back, g, atol=1e-4, rtol=1e-4)


def _failing_svd(fail_dtypes):
    real_svd = torch.linalg.svd

    def svd(a, *args, **kwargs):
        if a.dtype in fail_dtypes:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, *args, **kwargs)

    return svd


def test_svd_failure_in_fp32_retries_in_fp64(monkeypatch):
    g = torch.randn(8, 5)
    expected = _refreshed(g, 3, "right")
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd({torch.float32}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fp64 retry succeeds silently
        got = _refreshed(g, 3, "right")
    assert got.dtype == torch.float32
    assert torch.allclose(got.abs(), expected.abs(), atol=1e-5)


def test_svd_failure_keeps_previous_basis_and_warns_once(monkeypatch):
    p = torch.nn.Parameter(torch.randn(8, 5))
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": 1}])
    p.grad = torch.randn(8, 5)
    opt.step()
    before = opt.state[p]["proj_basis"].clone()
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd({torch.float32, torch.float64}))
    with pytest.warns(RuntimeWarning, match="keeping the previous projection basis") as rec:
        for _ in range(3):
            p.grad = torch.randn(8, 5)
            opt.step()
    assert len([w for w in rec if "previous projection basis" in str(w.message)]) == 1
    assert torch.equal(opt.state[p]["proj_basis"], before)
    assert torch.isfinite(p).all()


def test_non_finite_gradient_never_yields_a_nan_basis(monkeypatch):
    state = {}
    good = torch.randn(6, 4)
    PROJ.refresh(state, {"rank": 2}, good, "right")
    before = state["proj_basis"].clone()
    bad = good.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        PROJ.refresh(state, {"rank": 2}, bad, "right")
    assert torch.equal(state["proj_basis"], before)


def test_failure_before_any_basis_uses_coordinate_directions(monkeypatch):
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd({torch.float32, torch.float64}))
    state = {}
    with pytest.warns(RuntimeWarning, match="first coordinate directions"):
        SVDProjector().refresh(state, {"rank": 2}, torch.randn(6, 4), "left")
    torch.testing.assert_close(state["proj_basis"], torch.eye(6, 2))
