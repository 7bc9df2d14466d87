"""``subspace-optim train`` under ``torchrun --nproc_per_node 2`` (gloo on the CPU): DDP,
layer-wise DDP and FSDP2 end at the single-process run's parameters, and an FSDP2 run's
distributed checkpoint resumes on one rank.

The runs are in float64 (``training.dtype=fp64``) so that the comparison is to rounding:
transformers' RMSNorm still computes in float32, which bounds the agreement at ~1e-7
(measured 5.7e-8). Tolerances, relative to each tensor's largest magnitude: DDP 1e-6,
FSDP2 1e-5, as in test_distributed.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("typer")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

from subspace_optim.train import loop  # noqa: E402
from subspace_optim.train.checkpoint import load_checkpoint  # noqa: E402
from subspace_optim.train.config import ConfigError, load_config  # noqa: E402
from subspace_optim.train.dist_checkpoint import model_state  # noqa: E402
from subspace_optim.train.model import build_model  # noqa: E402

SETTINGS = [
    "model_config.hidden_size=32", "model_config.num_hidden_layers=2",
    "model_config.num_attention_heads=2", "model_config.intermediate_size=64",
    "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=60000",
    "data.max_val_bytes=20000", "training.batch_size=4", "training.warmup_steps=2",
    "training.steps=6", "training.eval_every=3", "training.eval_batches=2",
    "training.checkpoint_every=3", "training.log_every=2", "training.dtype=fp64",
    "optimizer.group={rank: 8, update_proj_gap: 3, scale: 0.25}",
]
TOL = {"ddp": 1e-6, "ddp-layerwise": 1e-6, "fsdp": 1e-5}


def _sets(root: Path, name: str, *extra: str) -> list[str]:
    args = []
    for s in [*SETTINGS, f"data.cache_dir={root / 'cache'}", f"output.dir={root}",
              f"output.name={name}", *extra]:
        args += ["--set", s]
    return args


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "subspace_optim", "train", "--no-progress", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _relative_diff(got: dict, want: dict) -> float:
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


def _parameters(run: Path) -> dict[str, torch.Tensor]:
    cfg = load_config(None, SETTINGS)
    model = build_model(cfg, cfg.data.vocab_size).double()
    return model_state(run / "checkpoints", model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    cfg = load_config(None, [*SETTINGS, f"data.cache_dir={root / 'cache'}",
                             f"output.dir={root}"])
    loop.train(cfg, root / "single", progress=False)
    _torchrun(2, *_sets(root, "ddp", "training.parallel=ddp"))
    _torchrun(2, *_sets(root, "ddp-layerwise", "training.parallel=ddp",
                        "training.layerwise=true"))
    _torchrun(2, *_sets(root, "fsdp", "training.parallel=fsdp"))
    return root


def _single(root: Path, name: str = "single") -> dict[str, torch.Tensor]:
    return load_checkpoint(root / name / "checkpoints")["model"]


@pytest.mark.parametrize("mode", list(TOL))
def test_torchrun_two_ranks_equals_one_process(runs, mode):
    want = _single(runs) if mode != "ddp-layerwise" else None
    if want is None:  # layer-wise clips by the previous step's norm: its own reference
        cfg = load_config(None, [*SETTINGS, f"data.cache_dir={runs / 'cache'}",
                                 f"output.dir={runs}", "training.layerwise=true"])
        loop.train(cfg, runs / "single-layerwise", progress=False)
        want = _single(runs, "single-layerwise")
    got = _parameters(runs / mode)
    assert _relative_diff(got, want) <= TOL[mode]
    # Rank 0 alone wrote the metrics: one record per logged step, not two.
    records = [json.loads(line) for line in (runs / mode / "metrics.jsonl").read_text()
               .splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [2, 4, 6]
    assert (runs / mode / "loss.png").exists()


def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(runs):
    """The 2-rank FSDP2 run's step-3 checkpoint, resumed with 1 rank, ends where the
    uninterrupted run ends."""
    run = runs / "fsdp-resumed"
    shutil.copytree(runs / "fsdp", run)
    checkpoints = run / "checkpoints"
    record = json.loads((checkpoints / "step_00000003.json").read_text())
    (checkpoints / "latest.json").write_text(json.dumps(record))
    for stale in checkpoints.glob("step_00000006*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    _torchrun(1, "--resume", str(run))
    assert _relative_diff(_parameters(run), _single(runs)) <= TOL["fsdp"]
    assert load_checkpoint(checkpoints)["world_size"] == 1
    # It continued from step 3: the first evaluation was not run again.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_ppl" in r] == [0, 3, 6]


@pytest.mark.parametrize("extra,match", [
    (["training.parallel=ddp"], "needs a torchrun launch"),
    (["training.parallel=fsdp", "training.layerwise=true"], "reduce-scatters"),
    (["training.parallel=ddp", "training.int8_weights=true"], "INT8 weights"),
    (["training.parallel=mpi"], "must be one of"),
])
def test_unsupported_launches_are_refused(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        cfg = load_config(None, [*SETTINGS, f"output.dir={tmp_path}", *extra])
        loop.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
