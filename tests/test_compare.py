"""``subspace-optim compare``: the runs it plans, and a real comparison's table and PNG."""

from __future__ import annotations

import csv
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("typer")
pytest.importorskip("matplotlib")

from subspace_optim.train.compare import _mark_best, plan_runs  # noqa: E402
from subspace_optim.train.config import ConfigError, load_config  # noqa: E402

TINY = [
    "model_config.hidden_size=32", "model_config.num_hidden_layers=2",
    "model_config.num_attention_heads=2", "model_config.intermediate_size=64",
    "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=60000",
    "data.max_val_bytes=20000", "training.batch_size=4", "training.warmup_steps=2",
    "training.steps=6", "training.eval_every=3", "training.eval_batches=2",
    "training.checkpoint_every=3", "training.log_every=2",
    "optimizer.group={rank: 8, update_proj_gap: 3, scale: 0.25}",
]


def test_the_baseline_gets_the_projected_runs_learning_rates_per_group():
    cfg = load_config(None, TINY)
    runs = plan_runs(cfg, ["GaLoreAdamW", "AdamW"], lr_sweep=False)
    baseline = runs[1]
    assert "optimizer.name=SubspaceAdamW" in baseline.overrides  # no rank: full rank
    assert "optimizer.lr=0.01" in baseline.overrides
    assert "optimizer.group={lr: 0.0025}" in baseline.overrides  # lr x scale


def test_lr_sweep_runs_three_rates_and_reports_the_best():
    cfg = load_config(None, TINY)
    runs = plan_runs(cfg, ["GaLoreAdamW", "AdamW"], lr_sweep=True)
    assert [r.lr for r in runs[:3]] == pytest.approx([0.01 / 3, 0.01, 0.03])
    assert len({r.name for r in runs}) == 6
    rows = [{"optimizer": "A", "final_val_ppl": p, "best": False} for p in (90.0, 80.0, 85.0)]
    _mark_best(rows)
    assert [r["best"] for r in rows] == [False, True, False]


def test_unknown_or_repeated_optimizers_are_refused():
    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match="unknown optimizer 'Adam'"):
        plan_runs(cfg, ["Adam"], False)
    with pytest.raises(ConfigError, match="unknown optimizer 'Projector'"):
        plan_runs(cfg, ["Projector"], False)
    with pytest.raises(ConfigError, match="twice"):
        plan_runs(cfg, ["GaLoreAdamW", "GaLoreAdamW"], False)


def test_compare_writes_the_table_and_the_png(tmp_path):
    from typer.testing import CliRunner

    from subspace_optim.cli import app

    sets = []
    for s in [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]:
        sets += ["--set", s]
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "default", "--optimizers",
                                      "SubspaceAdamW,GaLoreAdamW", "--out", str(out),
                                      "--no-progress", *sets])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["SubspaceAdamW", "GaLoreAdamW"]
    for r in rows:
        assert 1 < float(r["final_val_ppl"]) < 300  # trained below the vocabulary's 300
        assert int(r["optimizer_state_bytes"]) > 0 and float(r["tokens_per_s"]) > 0
    table = (out / "results.md").read_text()
    assert "| optimizer | lr | final validation perplexity |" in table
    assert "SubspaceAdamW" in table and "GaLoreAdamW" in table
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_finished_run_is_kept_when_the_comparison_continues(tmp_path):
    """A comparison stopped part-way continues: a run folder that reached the last step is
    read back, not trained again; one that stopped early is trained."""
    import json

    from subspace_optim.train.compare import _finished

    done, partial = tmp_path / "A", tmp_path / "B"
    for folder, last in ((done, 6), (partial, 3)):
        folder.mkdir()
        records = [{"step": 0, "val_loss": 5.0, "val_ppl": 150.0},
                   {"step": last, "val_loss": 4.0, "val_ppl": 55.0}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "A.json").write_text(json.dumps({"wall_s": 12.5}))
    assert _finished(done, 6) == 12.5
    assert _finished(partial, 6) is None
    assert _finished(tmp_path / "C", 6) is None


def test_compare_takes_module_class_of_another_package(tmp_path):
    """--optimizers accepts module:Class of an installed package, with the config's groups
    and keys (issue 21): galore-torch's GaLoreAdamW gets the keys it reads without a default,
    and its state is counted with its projector's basis; a name that
    does not import says so; a near miss of a class name is suggested."""
    pytest.importorskip("galore_torch")
    from subspace_optim.train.compare import plan_runs
    from subspace_optim.train.config import ConfigError, load_config

    cfg = load_config(None)
    runs = plan_runs(cfg, ["GaLoreAdamW", "galore_torch:GaLoreAdamW"], lr_sweep=False)
    assert runs[1].name == "galore_torch-GaLoreAdamW"
    assert any("proj_type: 'std'" in o for o in runs[1].overrides)
    with pytest.raises(ConfigError, match="cannot import 'no_such_package'"):
        plan_runs(cfg, ["no_such_package:AdamW"], lr_sweep=False)
    with pytest.raises(ConfigError, match="did you mean 'GaLoreAdamW'"):
        plan_runs(cfg, ["GaloreAdamW"], lr_sweep=False)


def test_the_lr_grid_grows_while_the_best_run_is_at_its_end():
    """FloraAdafactor's best run was at the top of its grid (0.03) and Lion's at the bottom:
    their rows measured the grid. The grid grows by 3x on the side of the best run, and
    stops once the best is inside (or after MAX_EXTENSIONS)."""
    from subspace_optim.train.compare import MAX_EXTENSIONS, grid_extensions, plan_runs
    from subspace_optim.train.config import load_config

    cfg = load_config(None)
    runs = plan_runs(cfg, ["SubspaceLion", "GaLoreAdamW"], lr_sweep=True)
    lrs = sorted({r.lr for r in runs if r.optimizer == "SubspaceLion"})

    def rows(ppl_of):
        return [{"optimizer": r.optimizer, "lr": r.lr, "final_val_ppl": ppl_of(r)}
                for r in runs]

    # Lion best at the lowest lr, GaLore inside: Lion's grid grows downwards only.
    more = grid_extensions(cfg, rows(lambda r: r.lr if r.optimizer == "SubspaceLion"
                                     else abs(r.lr - lrs[1])), runs)
    assert [(r.optimizer, r.lr) for r in more] == [("SubspaceLion", pytest.approx(lrs[0] / 3))]
    for _ in range(MAX_EXTENSIONS + 2):  # always better lower: grows, then stops
        more = grid_extensions(cfg, rows(lambda r: r.lr), runs)
        runs.extend(more)
    assert len({r.lr for r in runs if r.optimizer == "SubspaceLion"}) == 3 + MAX_EXTENSIONS


def test_a_variant_is_the_class_with_other_group_keys():
    """``GaLoreAdamW[svd=randomized]`` compares the randomized refresh with the full SVD in
    one command: the same class, the config's group with the variant's keys, its own run
    directory; a bad key or value is refused before any run."""
    from subspace_optim.train.compare import split_optimizers

    names = split_optimizers("GaLoreAdamW,GaLoreAdamW[svd=randomized, svd_niter=1],"
                             "GaLoreAdafactor[rank=8]")
    assert names == ["GaLoreAdamW", "GaLoreAdamW[svd=randomized, svd_niter=1]",
                     "GaLoreAdafactor[rank=8]"]
    runs = plan_runs(load_config("default", []), names, lr_sweep=False)
    assert [r.optimizer for r in runs] == names
    assert len({r.name for r in runs}) == 3
    assert "optimizer.name=GaLoreAdamW" in runs[1].overrides
    assert ("optimizer.group={rank: 32, update_proj_gap: 50, scale: 0.25, svd: 'randomized', "
            "svd_niter: 1}") in runs[1].overrides
    assert any("relative_step: false" in o for o in runs[2].overrides)
    for bad, text in [("GaLoreAdamW[svd=fast]", "Invalid svd: 'fast'"),
                      ("GaLoreAdamW[svd]", "key=value"),
                      ("AdamW[rank=3]", "full-rank baseline"),
                      ("GaLoreAdamW[rnak=3]", "did you mean 'rank'")]:
        with pytest.raises(ConfigError, match=re.escape(text)):
            plan_runs(load_config("default", []), [bad], lr_sweep=False)
