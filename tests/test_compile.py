"""``torch.compile(optimizer.step)``: a projected group compiles, matches eager, and a steady
step neither breaks the graph nor recompiles as the step count grows.

Refresh steps (an SVD with its fp64 fallback, a DCT selection, a Flora resample, a Grass
draw) run outside the graph by design (``optim.lifecycle.refresh``). The step count is a
Python int, which torch's automatic dynamic shapes specialise at the first step and make
dynamic at the second: one recompile during warm-up, none after.
"""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import subspace_optim as so

pytest.importorskip("torch._inductor")

CLASSES = ["GaLoreAdamW", "DCTAdamW", "FloraAdamW", "GrassAdamW"]
GAP = 5  # refreshes at steps 0, 5 and 10 of 12


def _build(cls):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 40))
    bias = torch.nn.Parameter(torch.randn(24))
    opt = cls([{"params": [bias]}, {"params": [weight], "rank": 4, "update_proj_gap": GAP}],
              lr=1e-2)
    return [weight, bias], opt


@pytest.mark.parametrize("name", CLASSES)
def test_compiled_step_matches_eager_and_a_steady_step_compiles_whole(name):
    cls = getattr(so, name)
    eager_params, eager = _build(cls)
    params, opt = _build(cls)
    compiles = []

    def counting_inductor(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    step = torch.compile(opt.step, backend=counting_inductor)
    gen = torch.Generator().manual_seed(1)
    for i in range(12):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, q, g in zip(eager_params, params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        before = len(compiles)
        step()
        for p, q in zip(eager_params, params, strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=f"step {i}")
        if i >= 3 and i % GAP != 0:  # after warm-up (steps 1 and 2 compile), steady steps
            assert len(compiles) == before, f"step {i} recompiled"
    assert compiles, "nothing was compiled"
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    explanation = torch._dynamo.explain(opt.step)()  # step 12: steady
    assert explanation.graph_break_count == 0, [str(b.reason) for b in
                                                explanation.break_reasons]
    assert explanation.graph_count == 1


# --------------------------------------------------------------------------- every class
def _registry_run(name, lr, steps=8):
    """``steps`` compiled steps of the registry's class under a LambdaLR scheduler (no
    refresh after the first step); returns (unique graphs compiled, the optimizer, params)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from optim_db import OPTIMIZERS
    from torch._dynamo.utils import counters

    record = OPTIMIZERS[name]
    if record.bnb:
        pytest.importorskip("bitsandbytes")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 40))
    bias = torch.nn.Parameter(torch.randn(24))
    kwargs = dict(record.kwargs)
    if record.has_lr:
        kwargs["lr"] = lr
    group = {"params": [weight], "rank": 4, "update_proj_gap": 1000}
    if name.startswith("QGaLore"):
        group["quant_group_size"] = 32
    opt = record.make([{"params": [bias]}, group], **kwargs)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
                 if record.has_lr else None)
    step = torch.compile(opt.step)
    graphs = []
    for _ in range(steps):
        weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
        step()
        if scheduler is not None:
            scheduler.step()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs, opt, [weight, bias]


def _torch_adamw_graphs(lr, steps=8):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    weight = torch.nn.Parameter(torch.randn(24, 40))
    opt = torch.optim.AdamW([weight], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    step = torch.compile(opt.step)
    for _ in range(steps):
        weight.grad = torch.randn_like(weight)
        step()
        scheduler.step()
    return counters["stats"]["unique_graphs"]


def _all_classes():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from optim_db import OPTIMIZERS

    return list(OPTIMIZERS)


@pytest.mark.parametrize("name", _all_classes())
def test_a_steady_step_with_a_tensor_lr_and_a_scheduler_is_one_graph(name):
    """Issue 20: with a tensor lr changed by LambdaLR, a steady step is one graph with no
    break and compiles no more after warm-up (the first step refreshes, eagerly; the second
    compiles the step count as dynamic). Before: 4 graphs and 3 breaks per step
    (Tensor.item()), Adafactor recompiled every step (math.pow of the step), OSD broke on
    out= into a strided tensor and on a branch on the lr."""
    graphs, opt, params = _registry_run(name, torch.tensor(1e-2))
    assert graphs[-1] == graphs[2], graphs  # nothing compiled after the third step
    for p in params:
        p.grad = torch.randn_like(p)
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_count == 1, explanation.graph_count
    assert explanation.graph_break_count == 0, [str(b.reason) for b in
                                                explanation.break_reasons]


@pytest.mark.parametrize("name", ["SubspaceAdamW", "GaLoreAdafactor", "SubspaceLion"])
def test_a_float_lr_recompiles_no_more_than_torchs_adamw(name):
    """A float lr that a scheduler changes is a constant of each graph, in torch's AdamW as
    here: neither compiles more than torch's does."""
    graphs, _, _ = _registry_run(name, 1e-2)
    assert graphs[-1] <= _torch_adamw_graphs(1e-2)
