"""The command line answers every user mistake in one line with exit status 2, and helps
(issue 22): missing optional packages name the extra to install from a checkout, near misses
of keys, classes and configs are suggested, a single path is taken where a list is
expected, a resumed run says where it resumes, and the deliberate full-rank baseline does
not warn that nothing is projected."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("typer")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from subspace_optim.cli import app  # noqa: E402
from subspace_optim.train.config import load_config  # noqa: E402

TINY = ["model_config.hidden_size=32", "model_config.num_hidden_layers=1",
        "model_config.num_attention_heads=2", "model_config.intermediate_size=64",
        "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=30000",
        "data.max_val_bytes=10000", "training.batch_size=4", "training.steps=4",
        "training.eval_every=4", "training.eval_batches=1", "training.checkpoint_every=2",
        "optimizer.group={rank: 8, update_proj_gap: 3}"]


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert flat.startswith("error:") and text in flat, result.output
    assert "Traceback" not in result.output


def _invoke(*args):
    return CliRunner(env={"COLUMNS": "400"}).invoke(app, list(args))


@pytest.mark.parametrize("command", ["memory", "train"])
def test_a_class_that_needs_bitsandbytes_without_it_is_one_line(command, tmp_path):
    """It was a 217-line traceback with exit 1."""
    code = ("import sys; sys.modules['bitsandbytes'] = None; "
            "from subspace_optim.cli import app; app()")
    args = [command, "--set", "optimizer.name=GaLoreAdamW8bit"]
    if command == "train":
        args += [a for item in TINY for a in ("--set", item)]
        args += ["--set", f"output.dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}",
                 "--no-progress"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "400"}, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "bitsandbytes" in out and 'pip install ".[bnb]"' in out and "Traceback" not in out


@pytest.mark.parametrize("args,text", [
    (["train", "--set", "training.step=10"], "unknown key 'training.step' (did you mean "
                                             "'steps'?)"),
    (["train", "defalt"], "unknown train config 'defalt' (did you mean 'default'?)"),
    (["compare", "default", "--optimizers", "GaloreAdamW"],
     "unknown optimizer 'GaloreAdamW' (did you mean 'GaLoreAdamW'?); the classes are "
     "AdamW, ApolloAdamW"),
    (["train", "--set", "optimizer.group={rnak: 32}"],
     "'rnak': did you mean 'rank'? GaLoreAdamW: without 'rank' the group would not be "
     "projected at all"),
    (["memory", "--set", "optimizer.name=NoSuchAdamW"], "unknown optimizer 'NoSuchAdamW'"),
])
def test_mistakes_are_one_line_with_a_suggestion(args, text):
    _one_line_error(_invoke(*args), text)


def test_a_single_path_is_taken_where_a_list_is_expected(tmp_path):
    cfg = load_config(None, [f"data.paths={tmp_path}/*.jsonl", "optimizer.target_modules=mlp"])
    assert cfg.data.paths == [f"{tmp_path}/*.jsonl"]
    assert cfg.optimizer.target_modules == ["mlp"]


def test_a_resumed_run_says_where_it_resumes(tmp_path):
    base = [a for item in TINY for a in ("--set", item)] + [
        "--set", f"output.dir={tmp_path / 'runs'}", "--set",
        f"data.cache_dir={tmp_path / 'cache'}", "--set", "output.name=r", "--no-progress"]
    first = _invoke("train", *base, "--set", "training.steps=2")
    assert first.exit_code == 0, first.output
    resumed = _invoke("train", "--resume", str(tmp_path / "runs" / "r"), "--set",
                      "training.steps=4", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from step 2 of 4" in resumed.output


def test_the_full_rank_baseline_does_not_warn_that_nothing_is_projected(tmp_path):
    """compare's AdamW baseline is full rank on purpose; its log said "no param group has
    'rank', so nothing is projected"."""
    import warnings

    from subspace_optim.train.model import build_model, build_optimizer

    cfg = load_config(None, [*TINY, "optimizer.name=SubspaceAdamW",
                             "optimizer.group={lr: 0.001}"])
    model = build_model(cfg, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = build_optimizer(model, cfg)
    assert not any("rank" in g for g in optimizer.param_groups)
