"""step_in_backward: per-layer updates in backward, accumulation in the subspace, clipping."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import subspace_optim as so
from subspace_optim.nn import quantize_linear_layers


class TinyLlama(torch.nn.Module):
    """A LLaMA-shaped decoder (embedding, RMSNorm, attention q/k/v/o, SwiGLU MLP, head)."""

    def __init__(self, vocab=96, dim=64, layers=3, heads=4, hidden=172):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.ModuleDict({
                "attn_norm": torch.nn.RMSNorm(dim),
                "q_proj": torch.nn.Linear(dim, dim, bias=False),
                "k_proj": torch.nn.Linear(dim, dim, bias=False),
                "v_proj": torch.nn.Linear(dim, dim, bias=False),
                "o_proj": torch.nn.Linear(dim, dim, bias=False),
                "mlp_norm": torch.nn.RMSNorm(dim),
                "gate_proj": torch.nn.Linear(dim, hidden, bias=False),
                "up_proj": torch.nn.Linear(dim, hidden, bias=False),
                "down_proj": torch.nn.Linear(hidden, dim, bias=False),
            })
            self.blocks.append(block)
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, t, d = x.shape
        for blk in self.blocks:
            h = blk["attn_norm"](x)
            q, k, v = (blk[n](h).view(b, t, self.heads, -1).transpose(1, 2)
                       for n in ("q_proj", "k_proj", "v_proj"))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["o_proj"](a.transpose(1, 2).reshape(b, t, d))
            h = blk["mlp_norm"](x)
            x = x + blk["down_proj"](F.silu(blk["gate_proj"](h)) * blk["up_proj"](h))
        return self.head(self.norm(x))


def _model(int8=False, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyLlama().to(dtype)
    if int8:
        quantize_linear_layers(model, ["_proj"])
    return model


def _groups(model, rank=16, gap=4, **extra):
    proj = [m.weight for n, m in model.named_modules() if n.endswith("_proj")]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in proj)]
    return [{"params": rest}, {"params": proj, "rank": rank, "update_proj_gap": gap, **extra}]


def _batch(step, micro=0, identical=False):
    gen = torch.Generator().manual_seed(1000 * step + (0 if identical else micro))
    return torch.randint(0, 96, (4, 12), generator=gen)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _train(model, opt, steps, k=1, layerwise=False, identical=False, scheduler=None, start=0,
           check_freed=True, **stepper_kwargs):
    handle = so.step_in_backward(opt, k, **stepper_kwargs) if layerwise else None
    for step in range(start, start + steps):
        for micro in range(k):
            _loss(model, _batch(step, micro, identical)).backward()
            if layerwise and check_freed:
                for name, m in model.named_modules():
                    if name.endswith("_proj"):
                        assert m.weight.grad is None, name  # freed inside backward
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    if handle is not None:
        handle.remove()
    return handle


def _assert_same(a, b, atol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if x.dtype == torch.uint8:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("projector", so.registered_projectors())
def test_single_step_windows_equal_the_ordinary_loop(projector):
    """accumulation_steps=1: the same updates in the same order, 30 steps, within 1e-6."""
    ordinary, layerwise = _model(), _model()
    _train(ordinary, so.SubspaceAdamW(_groups(ordinary, projector=projector), lr=3e-3), 30)
    _train(layerwise, so.SubspaceAdamW(_groups(layerwise, projector=projector), lr=3e-3), 30,
           layerwise=True)
    _assert_same(ordinary, layerwise, atol=1e-6)


def test_int8_weights_step_in_backward_too():
    ordinary, layerwise = _model(int8=True), _model(int8=True)
    _train(ordinary, so.QGaLoreAdamW8bit(_groups(ordinary), lr=3e-3), 10)
    _train(layerwise, so.QGaLoreAdamW8bit(_groups(layerwise), lr=3e-3), 10, layerwise=True)
    _assert_same(ordinary, layerwise, atol=1e-6)
    assert all(m.weight_grad is None for n, m in layerwise.named_modules() if n.endswith("_proj"))


def test_accumulation_is_exact_when_the_subspace_does_not_depend_on_the_gradient():
    """Flora's subspace comes from a seed, so the sum of projected micro-batch gradients is
    the projection of their sum: 4 distinct micro-batches, 30 steps across resamples (gap 4).
    Run in float64: the two sums round differently, and in fp32 Adam amplifies that
    (m / (sqrt(v) + eps) on near-cancelling coordinates) to 2e-5 after one step and 4e-3
    after 30; in fp64 the same amplification stays below 1e-9, so 1e-8 tests exactness."""
    ordinary, layerwise = _model(dtype=torch.float64), _model(dtype=torch.float64)
    _train(ordinary, so.FloraAdamW(_groups(ordinary), lr=3e-3), 30, k=4)
    _train(layerwise, so.FloraAdamW(_groups(layerwise), lr=3e-3), 30, k=4, layerwise=True)
    _assert_same(ordinary, layerwise, atol=1e-8)


def test_flora_adafactor_accumulates_full_gradients():
    """FloraAdafactor compresses only its momentum: in a window it accumulates full
    gradients like any full-rank parameter, so k=3 is exactly the ordinary loop (float64)."""
    ordinary, layerwise = _model(dtype=torch.float64), _model(dtype=torch.float64)
    _train(ordinary, so.FloraAdafactor(_groups(ordinary, rank=8), lr=1e-2, kappa=4), 10, k=3)
    _train(layerwise, so.FloraAdafactor(_groups(layerwise, rank=8), lr=1e-2, kappa=4), 10, k=3,
           layerwise=True, check_freed=False)
    _assert_same(ordinary, layerwise, atol=1e-8)


@pytest.mark.parametrize("projector", ["galore", "dct", "grass", "q_galore", "online_pca"])
def test_accumulation_fixes_the_subspace_at_the_first_micro_batch(projector):
    """Projectors that refresh from the gradient see the window's first micro-batch here and
    the window's sum in the ordinary loop. With four identical micro-batches the two have the
    same singular vectors, norms and cosines (the sum is 4x the first, up to rounding), so
    the runs must agree to 1e-5 over 30 steps and 7 refreshes; a window that refreshed at
    another micro-batch, or projected a gradient twice, would not."""
    ordinary, layerwise = _model(), _model()
    _train(ordinary, so.SubspaceAdamW(_groups(ordinary, projector=projector), lr=3e-3), 30,
           k=4, identical=True)
    _train(layerwise, so.SubspaceAdamW(_groups(layerwise, projector=projector), lr=3e-3), 30,
           k=4, identical=True, layerwise=True)
    _assert_same(ordinary, layerwise, atol=1e-5)


def _grad_bytes_tracker(model, opt):
    """Registered before step_in_backward's hooks, so it sees each gradient while alive."""
    peak = [0]

    def measure(_):
        alive = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                    if p.grad is not None)
        alive += sum(s["window_grad"].numel() * s["window_grad"].element_size()
                     for s in opt.state.values() if "window_grad" in s)
        peak[0] = max(peak[0], alive)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(measure)
    return peak


@pytest.mark.parametrize("k,bound", [(1, 0.30), (4, 0.45)])
def test_gradient_memory_peak(k, bound):
    """Bytes of gradients plus accumulators alive at the peak, against the full gradient of
    an ordinary backward, at rank d/4 (16 of 64). k=1 is the issue's bound (30%); with k=4
    the window accumulators (a quarter of the projected matrices) and the accumulating
    full-rank embedding, head and norms add up (measured 38%, bound 45%)."""
    model = _model()
    _loss(model, _batch(0)).backward()
    full = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    model.zero_grad()
    opt = so.GaLoreAdamW(_groups(model, rank=16))
    peak = _grad_bytes_tracker(model, opt)
    _train(model, opt, 3, k=k, layerwise=True)
    assert peak[0] < bound * full, (peak[0] / full)


def test_state_dict_and_scheduler_behave_as_in_ordinary_mode():
    ordinary, layerwise = _model(), _model()
    opt_a = so.GaLoreAdamW(_groups(ordinary), lr=1e-2)
    opt_b = so.GaLoreAdamW(_groups(layerwise), lr=1e-2)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1 / (1 + s))
    _train(ordinary, opt_a, 12, scheduler=sched_a)
    _train(layerwise, opt_b, 12, scheduler=sched_b, layerwise=True)
    assert sched_a.get_last_lr() == sched_b.get_last_lr()
    _assert_same(ordinary, layerwise, atol=1e-6)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    for pid, state in sd_a["state"].items():
        assert {k for k in sd_b["state"][pid] if k != "micro_step"} == set(state)


@pytest.mark.parametrize("clip", [{}, {"max_grad_norm": 0.5}], ids=["no-clip", "global-clip"])
def test_resume_in_this_mode_is_bit_exact(clip):
    """10 steps (k=2) straight, against 5 + save + weights_only load + 5. With global
    clipping the previous step's total norm scales the next step, so it must be in the
    checkpoint (it was not: the resumed run differed by 2e-2)."""
    def build():
        model = _model()
        return model, so.GaLoreAdamW(_groups(model), lr=3e-3)

    model, opt = build()
    _train(model, opt, 10, k=2, layerwise=True, **clip)
    half, half_opt = build()
    _train(half, half_opt, 5, k=2, layerwise=True, **clip)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "optim": half_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, resumed_opt = build()
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optim"])
    _train(resumed, resumed_opt, 5, k=2, layerwise=True, start=5, **clip)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if clip:
        assert ckpt["optim"]["subspace_optim"]["clip_norm"] > 0.5  # the bound was active


def test_per_parameter_clipping_matches_clipping_each_gradient():
    ordinary, layerwise = _model(), _model()
    opt_a = so.GaLoreAdamW(_groups(ordinary), lr=3e-3)
    for step in range(8):
        _loss(ordinary, _batch(step)).backward()
        for p in ordinary.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.05)
        opt_a.step()
        opt_a.zero_grad()
    _train(layerwise, so.GaLoreAdamW(_groups(layerwise), lr=3e-3), 8, layerwise=True,
           max_grad_norm=0.05, clip="per_parameter")
    _assert_same(ordinary, layerwise, atol=1e-6)


def test_global_clipping_uses_the_previous_total_norm_and_reports_the_norm():
    """float64, for the reason given in the Flora accumulation test: the total norm is
    summed in another order here than in the reference loop. One subspace (refreshed at
    step 0, where nothing is clipped yet): a float64 SVD of gradients a last bit apart can
    pick another subspace where singular values at the rank are close, which would
    compare the two subspaces rather than the clipping."""
    ordinary, layerwise = _model(dtype=torch.float64), _model(dtype=torch.float64)
    opt_a = so.GaLoreAdamW(_groups(ordinary, gap=100), lr=3e-3)
    norms, previous = [], None
    for step in range(8):
        _loss(ordinary, _batch(step)).backward()
        grads = [p.grad for p in ordinary.parameters()]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norms.append(total)
        if previous is not None:
            factor = (0.5 / (previous + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(factor)
        previous = total
        opt_a.step()
        opt_a.zero_grad()
    opt_b = so.GaLoreAdamW(_groups(layerwise, gap=100), lr=3e-3)
    handle = so.step_in_backward(opt_b, max_grad_norm=0.5)
    reported = []
    for step in range(8):
        _loss(layerwise, _batch(step)).backward()
        opt_b.step()
        reported.append(handle.grad_norm)
    handle.remove()
    _assert_same(ordinary, layerwise, atol=1e-8)
    torch.testing.assert_close(torch.stack(reported).double(), torch.stack(norms), rtol=1e-6,
                               atol=0)
    assert norms[0] > 0.5  # the clip bound was active


def test_remove_restores_ordinary_stepping():
    model = _model()
    opt = so.GaLoreAdamW(_groups(model), lr=3e-3)
    handle = so.step_in_backward(opt)
    handle.remove()
    _loss(model, _batch(0)).backward()
    assert model.embed.weight.grad is not None  # not consumed by a hook
    before = model.embed.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.embed.weight)


def test_bad_arguments():
    model = _model()
    opt = so.GaLoreAdamW(_groups(model))
    with pytest.raises(TypeError, match="needs an optimizer of subspace_optim, got AdamW"):
        so.step_in_backward(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 0"):
        so.step_in_backward(opt, 0)
    with pytest.raises(ValueError, match="Invalid clip: 'norm'"):
        so.step_in_backward(opt, clip="norm")
    with pytest.raises(ValueError, match="Invalid max_grad_norm: -1"):
        so.step_in_backward(opt, max_grad_norm=-1)
    so.step_in_backward(opt)
    with pytest.raises(RuntimeError, match="already active"):
        so.step_in_backward(opt)


def test_deepcopied_model_still_works():
    model = copy.deepcopy(_model(int8=True))
    opt = so.QGaLoreAdamW8bit(_groups(model))
    so.step_in_backward(opt)
    _loss(model, _batch(0)).backward()
    assert opt.state[model.blocks[0]["q_proj"].weight]["step"] == 1


def test_a_parameter_unfrozen_after_the_hooks_were_attached_steps_too():
    """A parameter frozen when step_in_backward was called and trainable later got a .grad
    every step and was never updated, silently (issue 19, point 5): it is hooked at the next
    step (stepping on that step's gradient) and steps inside backward after that, as one
    trainable from the start does."""
    def run(freeze_first):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
        if freeze_first:
            model[0].weight.requires_grad_(False)
        opt = so.GaLoreAdamW([{"params": [model[0].bias, model[1].bias]},
                              {"params": [model[0].weight, model[1].weight], "rank": 4}],
                             lr=1e-2)
        stepper = so.step_in_backward(opt)
        model[0].weight.requires_grad_(True)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(32, 16, generator=gen)).pow(2).mean().backward()
            opt.step()
        stepper.remove()
        return model[0].weight.detach().clone()

    with pytest.warns(RuntimeWarning, match="frozen when it was called are trainable now"):
        late = run(True)
    assert torch.equal(late, run(False))


def test_grad_scaler_with_layerwise_mode_is_refused_with_the_reason():
    model = _model()
    opt = so.GaLoreAdamW(_groups(model), lr=1e-3)
    stepper = so.step_in_backward(opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randint(0, 96, (2, 8))).pow(2).mean()).backward()
    with pytest.raises(RuntimeError, match="cannot be combined with torch.amp.GradScaler"):
        scaler.step(opt)
    stepper.remove()
    assert "_step_supports_amp_scaling" not in opt.__dict__
