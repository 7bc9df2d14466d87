"""APOLLO, APOLLO-Mini and Fira against their reference packages, and the randomized SVD
refresh (issue 21).

Parity: the same 100 steps of a drifting low-rank gradient stream (refreshes every 10 steps)
on a wide, a tall and a full-rank parameter, in float32; each result within 1e-5 of the
reference's, relative to the weight's scale. The projections are the same matrices: APOLLO
with ``generator="torch"`` draws its Gaussian as apollo-torch does (a torch.Generator seeded
with the parameter's seed, advanced by the same rule), Fira takes GaLore's float32 SVD as
fira does. The bound: both run the same arithmetic but for the first moment's update (a
lerp here, mul and add there: one rounding apart per step), about 100 steps x 2**-24 = 6e-6
with no amplification beyond Adam's normalisation (measured 2e-7 to 3e-7).
"""

import pytest
import torch
from references import gradient_stream

import subspace_optim as so

apollo_torch = pytest.importorskip("apollo_torch")
fira = pytest.importorskip("fira")

SHAPES = [(24, 40), (40, 24), (24,)]
STEPS = 100
TOLERANCE = 1e-5


def _pair(make_ours, make_reference):
    torch.manual_seed(0)
    inits = [torch.randn(s) for s in SHAPES]
    streams = [gradient_stream(s, STEPS, seed=i) for i, s in enumerate(SHAPES)]
    results = []
    for make in (make_ours, make_reference):
        params = [torch.nn.Parameter(x.clone()) for x in inits]
        opt = make(params)
        for t in range(STEPS):
            for p, stream in zip(params, streams, strict=True):
                p.grad = stream[t].clone()
            opt.step()
        results.append([p.detach() for p in params])
    moved = max((a - b).abs().max().item() for a, b in zip(results[1], inits, strict=True))
    assert moved > 1e-2  # both trained
    return max(((a - b).abs().max() / b.abs().max()).item()
               for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("scale_type,rank,scale", [("channel", 4, 2.0), ("tensor", 1, 128.0)])
@pytest.mark.parametrize("limiter", [True, False], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("front", [False, True], ids=["scale-after", "scale-front"])
def test_apollo_matches_apollo_torch(scale_type, rank, scale, limiter, front):
    keys = {"rank": rank, "update_proj_gap": 10, "scale": scale, "proj_type": "std",
            "scale_type": scale_type}

    def ours(params):
        return so.ApolloAdamW([{"params": params[:2], **keys, "generator": "torch"},
                               {"params": params[2:]}], lr=1e-2, norm_limiter=limiter,
                              scale_front=front)

    def reference(params):
        return apollo_torch.APOLLOAdamW([{"params": params[:2], **keys, "proj": "random"},
                                         {"params": params[2:]}], lr=1e-2,
                                        disable_nl=not limiter, scale_front=front)

    assert _pair(ours, reference) <= TOLERANCE


def test_fira_matches_fira():
    def ours(params):
        return so.FiraAdamW([{"params": params[:2], "rank": 4, "update_proj_gap": 10,
                              "scale": 0.25}, {"params": params[2:]}], lr=1e-2)

    def reference(params):
        return fira.FiraAdamW([{"params": params[:2], "rank": 4, "update_proj_gap": 10,
                                "alpha": 0.25, "proj_type": "std"}, {"params": params[2:]}],
                              lr=1e-2, no_deprecation_warning=True)

    assert _pair(ours, reference) <= TOLERANCE


def test_apollo_mini_keeps_two_vectors_and_a_seed_per_matrix():
    """APOLLO-Mini at rank 1: at most 2 (m + n) floats per m x n matrix plus a seed."""
    torch.manual_seed(0)
    shapes = [(64, 96), (96, 64), (128, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = so.ApolloMiniAdamW([{"params": params, "rank": 1}])
    assert opt.param_groups[0]["scale"] == 128.0
    assert opt.param_groups[0]["scale_type"] == "tensor"
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p, (m, n) in zip(params, shapes, strict=True):
        state = opt.state[p]
        seed_bytes = state["proj_seed"].numel() * state["proj_seed"].element_size()
        floats = (so.memory._tensor_bytes(state) - seed_bytes) / 4
        assert floats <= 2 * (m + n), (m, n, floats)
    via_groups = so.ApolloAdamW([so.ApolloAdamW.mini_groups(params)])
    assert via_groups.param_groups[0]["rank"] == 1


def test_apollo_and_fira_refuse_accumulation_windows():
    w = torch.nn.Parameter(torch.randn(24, 40))
    for cls in (so.ApolloAdamW, so.FiraAdamW):
        opt = cls([{"params": [w], "rank": 4}])
        so.step_in_backward(opt, accumulation_steps=2)
        with pytest.raises(RuntimeError, match="accumulation window"):
            (w.sum() * 2).backward()


# --------------------------------------------------------------------------- randomized SVD
def _gapped(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = torch.cat((torch.linspace(10, 5, r), torch.linspace(1, 0.01, k - r)))
    return (u[:, :k] * s) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_the_randomized_refresh_finds_the_top_subspace(shape, side):
    """With a spectral gap at the rank (10 to 5, then 1 and below) the randomized SVD's
    subspace is the full SVD's: the projections differ by the power iterations' residual,
    (1/5)**(2 niter + 1) of the gap's ratio (3e-4 at niter 2), bounded here by 1e-2."""
    from subspace_optim.projectors.svd import top_singular_basis

    a = _gapped(*shape, 16)
    full = top_singular_basis(a, 16, side)
    rand = top_singular_basis(a, 16, side, "randomized", 8, 2, seed=3)
    assert rand.shape == full.shape

    def projection(b):
        return b.T @ b if side == "right" else b @ b.T

    assert (projection(full) - projection(rand)).norm() <= 1e-2 * projection(full).norm()


def test_svd_key_on_every_svd_based_projector():
    torch.manual_seed(0)
    for cls, extra in ((so.GaLoreAdamW, {}), (so.QGaLoreAdamW, {"quant_group_size": 32}),
                       (so.OnlineSubspaceAdamW, {}), (so.FiraAdamW, {})):
        w = torch.nn.Parameter(torch.randn(48, 64))
        opt = cls([{"params": [w], "rank": 8, "svd": "randomized", "svd_niter": 1, **extra}])
        w.grad = torch.randn_like(w)
        opt.step()
        assert torch.isfinite(w).all()
        with pytest.raises(ValueError, match="Invalid svd: 'fast'"):
            cls([{"params": [w], "rank": 8, "svd": "fast", **extra}])
        with pytest.raises(ValueError, match="Invalid svd_niter: -1"):
            cls([{"params": [w], "rank": 8, "svd_niter": -1, **extra}])


def test_the_randomized_sketch_is_seeded_by_the_step_so_a_resume_repeats_it():
    torch.manual_seed(0)
    g = torch.randn(48, 64)

    def basis():
        w = torch.nn.Parameter(torch.zeros(48, 64))
        opt = so.GaLoreAdamW([{"params": [w], "rank": 8, "svd": "randomized"}])
        w.grad = g.clone()
        opt.step()
        return opt.state[w]["proj_basis"]

    assert torch.equal(basis(), basis())
