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
