"""What the optimizer does, visible (issue 20): the refresh counter and hook, the
per-parameter report, the training command's refresh counts and --verbose table, and the
memory planner on a Hugging Face config.json with per-pattern keys."""

import json

import pytest
import torch

import subspace_optim as so

pytest.importorskip("transformers")

from subspace_optim.train import loop  # noqa: E402
from subspace_optim.train.config import load_config  # noqa: E402

TINY = ["model_config.hidden_size=32", "model_config.num_hidden_layers=2",
        "model_config.num_attention_heads=2", "model_config.intermediate_size=64",
        "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=60000",
        "data.max_val_bytes=20000", "training.batch_size=4", "training.steps=6",
        "training.eval_every=6", "training.eval_batches=1", "training.log_every=2",
        "optimizer.group={rank: 8, update_proj_gap: 3}"]


def test_the_refresh_hook_and_counter_see_every_refresh():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 48))
    b = torch.nn.Parameter(torch.randn(32))
    opt = so.GaLoreAdamW([{"params": [b], "param_names": ["layer.bias"]},
                          {"params": [w], "rank": 4, "update_proj_gap": 2,
                           "param_names": ["layer.weight"]}])
    calls = []
    handle = opt.register_refresh_hook(lambda *args: calls.append(args))
    for _ in range(5):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert [(name, step, projector) for name, step, projector, _ in calls] == [
        ("layer.weight", 0, "galore"), ("layer.weight", 2, "galore"),
        ("layer.weight", 4, "galore")]
    assert all(seconds > 0 for *_, seconds in calls)
    assert opt.refresh_count == 3 and opt.last_refresh(w)[:2] == (3, 4)
    handle.remove()
    w.grad = torch.randn_like(w)
    for _ in range(2):
        opt.step()
    assert len(calls) == 3 and opt.refresh_count == 4  # counted, no longer reported


def _embedded_default(tmp_path, *extra):
    return load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}",
                              f"output.dir={tmp_path / 'runs'}", *extra])


def test_the_report_and_the_training_command_on_the_embedded_default(tmp_path):
    """The per-parameter report of a run of the embedded default's model and optimizer:
    every parameter once, the projected ones with their side, rank and refreshes, the
    bytes equal to optimizer_state_bytes; the run logs refreshes per window."""
    cfg = _embedded_default(tmp_path, "output.name=report")
    run_dir = loop.run_directory(cfg, "default")
    result = loop.train(cfg, run_dir, progress=False, verbose=True)
    table = result.state_table
    assert "model.layers.0.self_attn.q_proj.weight" in table and "full rank" in table
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    refreshes = [r["refreshes"] for r in records if "loss" in r]
    # 14 projected matrices refresh at steps 0 and 3 of 6 (windows of 2 steps).
    assert refreshes == [14, 14, 0]

    from subspace_optim.train.model import build_model, build_optimizer

    model = build_model(cfg, 300)
    opt = build_optimizer(model, cfg)
    for _ in range(4):
        model(input_ids=torch.randint(0, 300, (2, 16))).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    report = so.state_report(opt, model)
    names = [r.name for r in report.rows]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    projected = [r for r in report.rows if r.projector != "full rank"]
    assert len(projected) == 14
    assert all(r.rank == 8 and r.side in ("left", "right") for r in projected)
    assert all(r.refreshes == 2 and r.last_refresh_step == 3 for r in projected)
    assert report.total_bytes == so.optimizer_state_bytes(opt)
    assert report.to_dicts()[0].keys() == {"name", "shape", "projector", "side", "rank",
                                           "state_bytes", "refreshes", "last_refresh_step"}
    assert str(report).splitlines()[-1].startswith("total")


def test_the_planner_takes_a_hugging_face_config_and_per_pattern_keys(tmp_path):
    """subspace-optim memory on a config.json (grouped-query attention included) with a rank
    per pattern: the state is what the optimizer would create for that model."""
    from typer.testing import CliRunner

    from subspace_optim.cli import app

    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "vocab_size": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, [
        "memory", str(tmp_path), "--json", "--set",
        "optimizer.target_modules={self_attn: {rank: 8}, mlp: {rank: 16}}"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)
    # Moments of rank 8 (attention) and 16 (MLP), right side (d_in <= d_out) or left, fp32.
    attn = [(64, 64), (32, 64), (32, 64), (64, 64)]  # q, k, v (2 of 4 heads), o
    mlp = [(128, 64), (128, 64), (64, 128)]

    def moments(shapes, rank):
        return sum(2 * 4 * (max(m, n) * rank) for m, n in shapes)

    expected = 2 * (moments(attn, 8) + moments(mlp, 16))
    assert planned["optimizer_states"] >= expected  # plus the full-rank parameters' moments
    bad = CliRunner().invoke(app, ["memory", str(tmp_path / "nope.json")])
    assert bad.exit_code == 2 and "not found" in bad.output
