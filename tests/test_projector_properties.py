"""Hypothesis properties of the DCT, Flora and Grass projectors and of the INT4 quantiser."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import dct2_matrix

from subspace_optim.projectors import dct2_makhoul, dct_basis, flora_basis, get_projector
from subspace_optim.projectors.grass import select_rows
from subspace_optim.projectors.sampling import inclusion_probabilities
from subspace_optim.quant import (
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    unpack_int4,
)

EPS32 = torch.finfo(torch.float32).eps
CPU = torch.device("cpu")


def _matrix(seed, m, n):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- DCT
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 96))
def test_dct_basis_is_orthonormal_and_matches_the_definition(d):
    q = dct_basis(d, torch.float32, CPU)
    torch.testing.assert_close(q.T @ q, torch.eye(d), atol=10 * d * EPS32, rtol=0)
    torch.testing.assert_close(q, dct2_matrix(d), atol=1e-6, rtol=0)


def test_dct_basis_is_cached_and_shared():
    assert dct_basis(64, torch.float32, CPU) is dct_basis(64, torch.float32, CPU)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1), st.data())
def test_dct_selection_is_the_brute_force_top_k(m, n, seed, data):
    g = _matrix(seed, m, n)
    side = "right" if m >= n else "left"
    d = min(m, n)
    rank = data.draw(st.integers(1, d))
    proj = get_projector("dct")
    state = {}
    low = proj.refresh(state, {"rank": rank, "sim_type": "matmul"}, g, side)
    q = dct2_matrix(d)
    scores = []
    for k in range(d):  # score each basis vector on its own
        col = g @ q[:, k] if side == "right" else q[:, k] @ g
        scores.append((col.abs().sum().item(), k))
    ranked = sorted(scores, reverse=True)
    # Ties at the cut-off may go either way; everything strictly above it must be chosen.
    cutoff = ranked[rank - 1][0]
    chosen = set(state["proj_indices"].tolist())
    assert {k for s, k in ranked if s > cutoff * (1 + 1e-5)} <= chosen
    assert all(s >= cutoff * (1 - 1e-5) for s, k in scores if k in chosen)
    # The projected gradient returned at a refresh is G Q[:, idx] (or its transpose side).
    basis = proj.basis(state, {"rank": rank}, g, side)
    torch.testing.assert_close(low, proj.project(basis, g, side), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**31 - 1), st.data())
def test_makhoul_fft_gives_the_matmul_product_and_selection(m, n, seed, data):
    g = _matrix(seed, m, n)
    q = dct_basis(n, torch.float32, CPU)
    # fp32 FFT vs fp32 GEMM: both errors grow like log(n) and n ulps of the row norm.
    torch.testing.assert_close(dct2_makhoul(g), g @ q, atol=10 * n * EPS32 * g.abs().max().item(),
                               rtol=0)
    side = "right" if m >= n else "left"
    rank = data.draw(st.integers(1, min(m, n)))
    proj = get_projector("dct")
    picks = []
    for sim_type in ("matmul", "makhoul"):
        state = {}
        proj.refresh(state, {"rank": rank, "sim_type": sim_type}, g, side)
        picks.append(state["proj_indices"].tolist())
    if picks[0] != picks[1]:
        # Only a near-tie at the cut-off may differ between the two (rounding noise).
        t = g @ dct_basis(n, torch.float32, CPU) if side == "right" else \
            dct_basis(m, torch.float32, CPU).T @ g
        s = t.abs().sum(dim=0 if side == "right" else 1)
        diff = set(picks[0]) ^ set(picks[1])
        assert (s[list(diff)].max() - s[list(diff)].min()) <= 1e-4 * s.max()


# --------------------------------------------------------------------------- Flora
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 30), st.integers(1, 30), st.data())
def test_flora_projection_is_reproducible_from_its_seed_alone(seed, m, n, data):
    side = "right" if m >= n else "left"
    rank = data.draw(st.integers(1, min(m, n)))
    a = flora_basis(seed, (m, n), rank, side == "right", CPU, torch.float32)
    b = flora_basis(seed, (m, n), rank, side == "right", CPU, torch.float32)
    assert torch.equal(a, b)
    other = flora_basis(seed + 1, (m, n), rank, side == "right", CPU, torch.float32)
    assert not torch.equal(a, other)


def test_flora_projection_is_isotropic_on_average():
    """E[P P^T] = I for P = A^T with A ~ N(0, 1/r): the mean over N seeds is within 5
    standard errors of I elementwise (off-diagonal SE sqrt(1/(rN)), diagonal sqrt(2/(rN)))."""
    m, n, rank, draws = 12, 40, 4, 3000
    total = torch.zeros(m, m)
    for seed in range(draws):
        p = flora_basis(seed, (m, n), rank, False, CPU, torch.float32)  # left: m x r
        total += p @ p.T
    mean = total / draws
    se = torch.full((m, m), math.sqrt(1 / (rank * draws)))
    se.diagonal().fill_(math.sqrt(2 / (rank * draws)))
    assert ((mean - torch.eye(m)).abs() <= 5 * se).all()


# --------------------------------------------------------------------------- Grass
def _grass_estimate(g, rank, selection, seed):
    proj = get_projector("grass")
    gen = torch.Generator().manual_seed(seed)
    idx, scales = select_rows(g.pow(2).sum(1), rank, selection, gen)
    state = {"proj_indices": idx, "proj_scales": scales}
    basis = proj.basis(state, {}, g, "left")
    return proj.project_back(basis, proj.project(basis, g, "left"), "left"), idx


def test_grass_multinomial_estimate_is_unbiased():
    """Mean of P P^T G over many draws equals G: every element within 5 standard errors of
    the Horvitz-Thompson estimator (SE = |g_ij| sqrt((1 - pi_i) / (pi_i N)))."""
    torch.manual_seed(0)
    g = torch.randn(16, 10) * torch.logspace(-1, 1, 16)[:, None]  # very unequal row norms
    rank, draws = 5, 4000
    pi = inclusion_probabilities(g.pow(2).sum(1), rank).float()
    assert (pi == 1).any() and (pi < 1).any(), "the case should include a capped row"
    total = torch.zeros_like(g, dtype=torch.float64)  # fp32 sums of 4000 draws would drift
    for seed in range(draws):
        est, idx = _grass_estimate(g, rank, "multinomial", seed)
        assert idx.unique().numel() == rank  # without replacement
        total += est
    mean = (total / draws).float()
    se = g.abs() * ((1 - pi) / (pi * draws)).sqrt()[:, None]
    assert ((mean - g).abs() <= 5 * se + 1e-6).all()


def test_grass_uniform_estimate_is_unbiased():
    torch.manual_seed(1)
    g = torch.randn(12, 6)
    rank, draws = 4, 4000
    total = torch.zeros_like(g, dtype=torch.float64)
    for seed in range(draws):
        total += _grass_estimate(g, rank, "uniform", seed)[0]
    pi = rank / 12
    se = g.abs() * math.sqrt((1 - pi) / (pi * draws))
    assert (((total / draws).float() - g).abs() <= 5 * se + 1e-6).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=40), st.data())
def test_inclusion_probabilities_sum_to_rank_and_stay_in_unit_interval(weights, data):
    rank = data.draw(st.integers(1, len(weights)))
    pi = inclusion_probabilities(torch.tensor(weights), rank)
    assert abs(pi.sum().item() - rank) < 1e-6
    assert (pi >= 0).all() and (pi <= 1).all()


def test_grass_topk_keeps_the_largest_rows_unscaled():
    g = torch.tensor([[0.1, 0.0], [3.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    idx, scales = select_rows(g.pow(2).sum(1), 2, "topk", torch.Generator())
    assert idx.tolist() == [1, 2] and scales.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- INT4
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700), st.sampled_from([1, 7, 64, 256]), st.sampled_from([4, 8]),
       st.integers(0, 2**31 - 1), st.floats(-3, 3), st.sampled_from([1e-3, 1.0, 50.0]))
def test_groupwise_round_trip_within_half_a_step(numel, group, bits, seed, shift, scale):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale + shift
    codes, scales, zeros = quantize_groupwise(x, bits, group)
    assert codes.dtype == torch.uint8 and zeros.dtype == torch.uint8
    assert codes.numel() == (math.ceil(numel / 2) if bits == 4 else numel)
    y = dequantize_groupwise(codes, scales, zeros, numel, bits, group)
    step = scales.repeat_interleave(group)[:numel]
    # Half a step, plus the float32 rounding of s * (q - z) (a few ulps of the value).
    assert ((y - x).abs() <= step / 2 + 4 * EPS32 * x.abs().clamp(min=step)).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600), st.integers(0, 2**31 - 1), st.sampled_from([1.0, -1.0]))
def test_zero_is_exactly_representable_even_in_single_sign_groups(numel, seed, sign):
    x = sign * (1 + torch.rand(numel, generator=torch.Generator().manual_seed(seed)))
    x[::3] = 0.0
    y = dequantize_groupwise(*quantize_groupwise(x, 4, 256), numel, 4, 256)
    assert (y[::3] == 0).all()
    # Q-GaLore's reference clips such groups ([1, 2] -> [1, 1]); this must not.
    assert ((y - x).abs() <= (x.abs().max() + 1) / 15).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=0, max_size=101))
def test_int4_packing_is_inverse_of_unpacking(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == math.ceil(len(values) / 2)
    assert torch.equal(unpack_int4(packed, len(values)), codes)
