"""Properties of the Projector contract, for every registered projector and variant
(Hypothesis over shapes, ranks, sides and gradients).

Every projector: the projected gradient has the subspace's shape, and ``update_weight_``
is ``beta W + alpha project_back(low)`` (the in-place, fused-decay path and the plain one
agree). Orthonormal ones (per the registry), right after a refresh: projecting back and
forth is idempotent and never increases the norm, projecting a subspace element back in
returns it, and re-projecting moments onto an unchanged basis is the identity.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_db import PROJECTORS

from subspace_optim.projectors import get_projector, projected_shape, resolve_side

CASES = [(p, v) for p, record in PROJECTORS.items() for v in record.variants]


@st.composite
def matrices(draw, projector):
    m = draw(st.integers(1, 20))
    n = draw(st.integers(1, 20))
    rank = draw(st.integers(1, min(m, n)))
    proj_types = get_projector(projector).proj_types
    proj_type = draw(st.sampled_from([t for t in proj_types if t != "reverse_std"]))
    seed = draw(st.integers(0, 2**16))
    return m, n, rank, proj_type, seed


def _refreshed(projector, variant, m, n, rank, proj_type, seed):
    record = PROJECTORS[projector]
    proj = get_projector(projector)
    group = {**proj.group_defaults, **record.group(variant), "rank": rank,
             "proj_type": proj_type, "lr": 1e-3, "weight_decay": 0.0}
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64).float()
    side = resolve_side((m, n), proj_type)
    state = {}
    proj.init_state(state, group, 1)
    proj.refresh(state, group, g, side)
    return proj, state, group, g, side, proj.basis(state, group, g, side)


def _close(a, b, scale=1.0):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize("projector,variant", CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_every_projector_honours_the_contract(projector, variant):
    @settings(max_examples=25, deadline=None)
    @given(matrices(projector))
    def check(case):
        m, n, rank, proj_type, seed = case
        proj, state, group, g, side, basis = _refreshed(projector, variant, *case)
        low = proj.project(basis, g, side)
        assert tuple(low.shape) == projected_shape((m, n), rank, side)
        gen = torch.Generator().manual_seed(seed + 1)
        w = torch.randn(m, n, generator=gen)
        n_low = torch.randn(low.shape, generator=gen)
        expected = 0.9 * w + (-0.3) * proj.project_back(basis, n_low, side)
        proj.update_weight_(basis, n_low, side, w, -0.3, 0.9)
        _close(w, expected, float(expected.abs().max()))

    check()


ORTHONORMAL = [(p, v) for p, v in CASES if v in PROJECTORS[p].orthonormal]


@pytest.mark.parametrize("projector,variant", ORTHONORMAL,
                         ids=[f"{p}-{v}" for p, v in ORTHONORMAL])
def test_orthonormal_projections_are_idempotent_and_reproject_onto_themselves(projector,
                                                                             variant):
    @settings(max_examples=25, deadline=None)
    @given(matrices(projector))
    def check(case):
        proj, state, group, g, side, basis = _refreshed(projector, variant, *case)
        once = proj.project_back(basis, proj.project(basis, g, side), side)
        twice = proj.project_back(basis, proj.project(basis, once, side), side)
        scale = float(g.abs().max())
        _close(twice, once, scale)
        assert float(once.norm()) <= float(g.norm()) * (1 + 1e-5) + 1e-6
        low = proj.project(basis, g, side)
        _close(proj.project(basis, proj.project_back(basis, low, side), side), low, scale)
        _close(proj.reproject(basis, basis, low, side), low, scale)

    check()


@pytest.mark.parametrize("projector,variant", CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_project_back_computes_in_the_low_rank_operands_dtype(projector, variant):
    """A basis refreshed from a bf16 gradient (the weight's dtype) brought back with float32
    moments: the result is float32 and equals the back-projection of the same basis cast to
    float32 up front (FiraAdamW with bf16 weights failed on a dtype mismatch)."""
    record = PROJECTORS[projector]
    proj = get_projector(projector)
    group = {**proj.group_defaults, **record.group(variant), "rank": 3, "proj_type": "std",
             "lr": 1e-3, "weight_decay": 0.0}
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(0)).bfloat16()
    side = resolve_side((12, 20), "std")
    state = {}
    proj.init_state(state, group, 1)
    proj.refresh(state, group, g, side)
    basis = proj.basis(state, group, g, side)
    low = proj.project(basis, g, side).float()
    back = proj.project_back(basis, low, side)
    assert back.dtype == torch.float32 and back.shape == g.shape
    if isinstance(basis, torch.Tensor):
        up = basis.float()
        _close(back, proj.project_back(up, low, side), float(back.abs().max()))
