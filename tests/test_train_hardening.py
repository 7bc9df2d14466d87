"""The training command under a demanding user (hardening issue, points 7 and 9 to 13):
interrupts, resumed metrics, the token cache, bad input, and what --resume may change."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("typer")

from typer.testing import CliRunner  # noqa: E402

from subspace_optim.cli import app  # noqa: E402
from subspace_optim.optim import engine  # noqa: E402
from subspace_optim.train import data, loop  # noqa: E402
from subspace_optim.train.checkpoint import load_checkpoint, write_atomic  # noqa: E402
from subspace_optim.train.config import ConfigError, load_config  # noqa: E402

TINY = [
    "model_config.hidden_size=32", "model_config.num_hidden_layers=2",
    "model_config.num_attention_heads=2", "model_config.intermediate_size=64",
    "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=60000",
    "data.max_val_bytes=20000", "training.batch_size=4", "training.warmup_steps=2",
    "training.eval_every=3", "training.eval_batches=2", "training.checkpoint_every=3",
    "training.log_every=2", "training.steps=8",
    "optimizer.group={rank: 8, update_proj_gap: 3, scale: 0.25}",
]
# Fields that measure the machine, not the run.
TIMING = ("tokens_per_s", "peak_memory_bytes")


@pytest.fixture
def tiny(tmp_path):
    def make(*extra):
        return load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}",
                                  f"output.dir={tmp_path / 'runs'}", *extra])
    return make


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _final_model(run_dir):
    return load_checkpoint(run_dir / "checkpoints")["model"]


def _assert_same_run(a, b):
    ma, mb = _final_model(a), _final_model(b)
    for key, value in ma.items():
        assert torch.equal(value, mb[key]), key
    assert _records(a) == _records(b)


def _interrupt_in_the_middle_of_step(monkeypatch, at_step, params_before_signal=3,
                                     signum=signal.SIGINT):
    """SIGINT arrives during update number ``at_step`` (0-based), after a few parameters
    have been updated and before the others are (in ordinary mode inside optimizer.step(),
    in layer-wise mode inside backward)."""
    finish = engine.finish
    calls = {"n": 0}

    def finish_one_by_one(opt, items, group):
        per_step = sum(len(g["params"]) for g in opt.param_groups)
        for item in items:
            finish(opt, [item], group)
            calls["n"] += 1
            if calls["n"] == at_step * per_step + params_before_signal:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(engine, "finish", finish_one_by_one)


# --------------------------------------------------------------------------- point 9
@pytest.mark.parametrize("layerwise", [False, True], ids=["ordinary", "layerwise"])
def test_ctrl_c_while_parameters_update_stops_at_the_step_boundary(tiny, monkeypatch, layerwise):
    """Before: the interrupt landed between two parameter updates and the checkpoint was
    stamped with the old step, so the resumed run applied some updates twice."""
    extra = ["training.layerwise=true"] if layerwise else []
    straight = tiny("output.name=straight", *extra)
    loop.train(straight, loop.run_directory(straight, "a"), progress=False)
    cfg = tiny("output.name=stopped", *extra)
    run_dir = loop.run_directory(cfg, "b")
    with monkeypatch.context() as patch:
        _interrupt_in_the_middle_of_step(patch, at_step=4)
        first = loop.train(cfg, run_dir, progress=False)
    assert first.interrupted and first.steps == 5  # step 5 completed, then stopped
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 5
    loop.train(cfg, run_dir, resume=True, progress=False)
    _assert_same_run(straight_dir(straight), run_dir)


def straight_dir(cfg):
    return loop.Path(cfg.output.dir) / cfg.output.name


def test_the_cli_exits_130_after_saving_on_ctrl_c(tiny, tmp_path, monkeypatch):
    _interrupt_in_the_middle_of_step(monkeypatch, at_step=2)
    args = ["train", "--no-progress", *[a for item in TINY for a in ("--set", item)],
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set",
            f"output.dir={tmp_path / 'runs'}", "--set", "output.name=cli"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "stopped at step 3" in result.output
    assert load_checkpoint(tmp_path / "runs" / "cli" / "checkpoints")["step"] == 3


# --------------------------------------------------------------------------- point 10
def test_resumed_metrics_match_the_uninterrupted_run_line_for_line(tiny):
    """Stopped at step 5, mid log window (log_every 2): before, the first loss after the
    resume was divided by the whole window (5.11 against 6.44)."""
    straight = tiny("output.name=straight")
    loop.train(straight, loop.run_directory(straight, "a"), progress=False)
    cfg = tiny("output.name=stopped")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=5)
    loop.train(cfg, run_dir, resume=True, progress=False)
    _assert_same_run(straight_dir(straight), run_dir)


def test_records_logged_after_the_last_checkpoint_are_not_duplicated(tiny):
    """A kill after a log line but before the next checkpoint: the run logged steps 4
    (train) up to 5 but only the checkpoint of step 3 survives."""
    straight = tiny("output.name=straight")
    loop.train(straight, loop.run_directory(straight, "a"), progress=False)
    cfg = tiny("output.name=killed")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=5)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_00000005.pt").unlink()  # as if killed before it was written
    (checkpoints / "step_00000005.json").unlink()
    (checkpoints / "latest.json").write_text((checkpoints / "step_00000003.json").read_text())
    assert any(r["step"] == 4 for r in _records(run_dir))
    loop.train(cfg, run_dir, resume=True, progress=False)
    _assert_same_run(straight_dir(straight), run_dir)


# --------------------------------------------------------------------------- point 7
def test_a_nonfinite_gradient_is_skipped_counted_and_logged(tiny, monkeypatch):
    build = loop.build_optimizer
    seen = {"backward": 0}

    def poisoned(model, cfg):
        opt = build(model, cfg)
        weight = model.model.layers[0].self_attn.q_proj.weight

        def hook(grad):
            seen["backward"] += 1
            return grad * float("nan") if seen["backward"] == 3 else grad

        weight.register_hook(hook)
        return opt

    monkeypatch.setattr(loop, "build_optimizer", poisoned)
    cfg = tiny("output.name=nan", "training.max_grad_norm=null")
    result = loop.train(cfg, loop.run_directory(cfg, "n"), progress=False)
    assert result.skipped_steps == 1 and result.steps == 8
    train_records = [r for r in _records(result.run_dir) if "loss" in r]
    assert [r["skipped_steps"] for r in train_records] == [0, 1, 0, 0]
    assert all(torch.isfinite(v).all() for v in _final_model(result.run_dir).values()
               if v.is_floating_point())


# --------------------------------------------------------------------------- point 11
def test_the_token_cache_follows_the_file_content(tiny, tmp_path):
    """Before: keyed by path only, so a changed file trained on its old tokens."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def alpha(x):\n    return x + 1\n" * 400)
    cfg = tiny("data.source=files", f"data.paths=[{corpus}]").data
    _, first, _ = data.prepare(cfg, 0, 4)
    stat = corpus.stat()
    corpus.write_text("class Beta:\n    value = 222222\n" * 400)  # same size
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert corpus.stat().st_size == stat.st_size
    _, second, _ = data.prepare(cfg, 0, 4)
    assert not torch.equal(first.sequences, second.sequences)


def test_two_writers_of_one_cache_file_never_collide(tmp_path):
    """Before: both wrote the same fixed temporary name."""
    target = tmp_path / "tokens.pt"
    first_started, second_done = threading.Event(), threading.Event()
    errors = []

    def slow(f):
        f.write(b"first")
        first_started.set()
        second_done.wait(5)

    def run_first():
        try:
            write_atomic(target, slow)
        except Exception as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    thread = threading.Thread(target=run_first)
    thread.start()
    first_started.wait(5)
    write_atomic(target, lambda f: f.write(b"second"))
    second_done.set()
    thread.join()
    assert not errors and target.read_bytes() == b"first"
    assert not list(tmp_path.glob("*.tmp"))


def test_two_runs_starting_at_once_on_an_empty_cache_both_succeed(tmp_path):
    code = ("import sys; from subspace_optim.train.config import load_config; "
            "from subspace_optim.train.data import prepare; "
            f"cfg = load_config(None, {TINY!r} + ['data.cache_dir={tmp_path}']); "
            "tok, b, v = prepare(cfg.data, 0, 4); print(int(b.sequences.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]


# --------------------------------------------------------------------------- point 12
def _cli(tmp_path, *items, resume=None):
    args = ["train", "--no-progress", *[a for item in TINY for a in ("--set", item)],
            "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"output.dir={tmp_path / 'runs'}",
            *[a for item in items for a in ("--set", item)]]
    if resume is not None:
        args = ["train", "--no-progress", "--resume", str(resume),
                *[a for item in items for a in ("--set", item)]]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("item,match", [
    ("training.batch_size=0", "training.batch_size must be >= 1, got 0"),
    ("training.eval_every=0", "training.eval_every must be >= 1, got 0"),
    ("training.checkpoint_every=0", "training.checkpoint_every must be >= 1, got 0"),
    ("training.log_every=0", "training.log_every must be >= 1, got 0"),
    ("data.seq_len=0", "data.seq_len must be >= 1, got 0"),
    ("training.accumulation_steps=0", "training.accumulation_steps must be >= 1, got 0"),
    ("training.steps=0", "training.steps must be >= 1, got 0"),
    ("training.steps=-5", "training.steps must be >= 1, got -5"),
    ("training.max_grad_norm=-1", "training.max_grad_norm must be > 0, or null"),
    ("training.device=tpu", "training.device must be one of auto, cpu, cuda"),
    ("output.name=../escape", "output.name must be a relative name"),
    ("output.name=/tmp/abs", "output.name must be a relative name"),
    ("optimizer.group={rnak: 32}", "'rnak': did you mean 'rank'"),
    ("optimizer.group={rank: 4, update_proj_gpa: 5}", "'update_proj_gpa': did you mean"),
])
def test_bad_values_exit_2_naming_the_key_and_leave_no_run_directory(tmp_path, item, match):
    result = _cli(tmp_path, "output.name=bad", item)
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split())
    assert not (tmp_path / "runs" / "bad").exists()


def test_an_unavailable_device_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _cli(tmp_path, "training.device=cuda", "output.name=bad")
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", "gave no train text"),
    ("binary.txt", bytes(range(256)) * 8, "a NUL byte; this looks like a binary file"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1") * 10, "not UTF-8 text"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2: not valid JSON"),
    ("fields.jsonl", b'{"body": "no text field"}\n', "line 1: no 'text' field"),
    ("typed.jsonl", b'{"text": 5}\n', "line 1: 'text' is a int, not text"),
    ("data.csv", b"a,b\n", "unsupported type '.csv'"),
])
def test_bad_data_files_exit_2_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    result = _cli(tmp_path, "data.source=files", f"data.paths=[{path}]", "output.name=bad")
    assert result.exit_code == 2, result.output
    flat = "".join(result.output.split())
    assert name in flat and "".join(match.split()) in flat
    assert not (tmp_path / "runs" / "bad").exists()


# --------------------------------------------------------------------------- point 13
def test_resume_may_extend_the_run_and_refuses_other_changes(tmp_path):
    assert _cli(tmp_path, "output.name=run", "training.steps=4").exit_code == 0
    run_dir = tmp_path / "runs" / "run"
    refused = _cli(tmp_path, "optimizer.lr=0.5", resume=run_dir)
    assert refused.exit_code == 2 and "--set optimizer.lr: cannot change on --resume" in \
        " ".join(refused.output.split())
    finished = _cli(tmp_path, resume=run_dir)
    assert finished.exit_code == 0 and "is finished: step 4 of 4" in \
        " ".join(finished.output.split())
    extended = _cli(tmp_path, "training.steps=6", resume=run_dir)
    assert extended.exit_code == 0, extended.output
    assert "resume: training.steps 4 -> 6" in extended.output
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 6
    assert json.loads((run_dir / "config.json").read_text())["training"]["steps"] == 6


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny):
    cfg = tiny("output.name=damaged", "training.checkpoint_every=2")
    run_dir = loop.run_directory(cfg, "d")
    loop.train(cfg, run_dir, progress=False, stop_after=5)
    latest = run_dir / "checkpoints" / "step_00000005.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=r"step_00000005.pt is incomplete or corrupted: "
                                            r"not loading it; resuming from .* step 4"):
        ckpt = load_checkpoint(run_dir / "checkpoints")
    assert ckpt["step"] == 4
    with pytest.warns(RuntimeWarning):
        result = loop.train(cfg, run_dir, resume=True, progress=False)
    assert result.steps == 8


def test_config_errors_name_the_key(tiny):
    with pytest.raises(ConfigError, match="data.vocab_size must be >= 257"):
        tiny("data.vocab_size=100")


# --------------------------------------------------------------------------- issue 19, 7-13
def test_a_half_written_last_metrics_line_is_dropped_on_resume(tiny):
    """Point 7: a kill or a full disk during a log write leaves a line cut short; --resume
    crashed with JSONDecodeError. The line is dropped (the resumed run writes it again)."""
    straight = tiny("output.name=straight")
    loop.train(straight, loop.run_directory(straight, "a"), progress=False)
    cfg = tiny("output.name=cut")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=5)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 4.1')
    loop.train(cfg, run_dir, resume=True, progress=False)
    _assert_same_run(straight_dir(straight), run_dir)


def test_a_damaged_middle_metrics_line_is_refused_with_its_number(tiny):
    cfg = tiny("output.name=damaged")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=5)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl: line 2 is damaged"):
        loop.train(cfg, run_dir, resume=True, progress=False)


def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(tiny, tmp_path):
    """Point 8: the run directory held config.json and no checkpoint: --resume said "no
    checkpoint" and a new start "already holds a run". --resume now starts it again."""
    straight = tiny("output.name=straight")
    loop.train(straight, loop.run_directory(straight, "a"), progress=False)
    cfg = tiny("output.name=killed")
    run_dir = loop.run_directory(cfg, "b")
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "val_loss": 7.0, "val_ppl": 1100.0}\n')
    result = _cli(tmp_path, resume=run_dir)
    assert result.exit_code == 0, result.output
    assert "no checkpoint yet" in " ".join(result.output.split())
    _assert_same_run(straight_dir(straight), run_dir)


def test_a_failed_checkpoint_write_says_why_and_keeps_the_previous(tiny, monkeypatch):
    """Point 9: a full disk made torch say "[enforce fail at inline_container.cc:672]
    unexpected pos". The error says so in words, and the previous checkpoint is intact."""
    from subspace_optim.train import checkpoint as ckpt_module

    cfg = tiny("output.name=full", "training.checkpoint_every=2")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=3)  # checkpoints at 2 and 3
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    with pytest.raises(ckpt_module.CheckpointError,
                       match=r"checkpoint of step 4 .*the disk is full or the file exceeds the "
                             r"file-size limit; the previous checkpoint \(step 3\) is intact"):
        loop.train(cfg, run_dir, resume=True, progress=False)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tiny):
    cfg = tiny("output.name=tmpfiles")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=3)
    stale = run_dir / "checkpoints" / ".step_00000006.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    loop.train(cfg, run_dir, resume=True, progress=False)
    assert not stale.exists()


@pytest.mark.parametrize("edit,change", [
    ({"training": {"batch_size": 8}}, "training.batch_size: 4 -> 8"),
    ({"optimizer": {"lr": 0.5}}, "optimizer.lr"),
    ({"training": {"seed": 7}}, "training.seed: 0 -> 7"),
])
def test_an_edited_config_json_is_judged_as_set_would_be(tiny, edit, change):
    """Point 10: an edit of config.json before --resume silently changed the run (batch
    size, seed), was ignored (lr: the checkpoint won) or ended in a traceback. It is
    compared with the configuration the checkpoint was saved with."""
    cfg = tiny("output.name=edited")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=3)
    saved = json.loads((run_dir / "config.json").read_text())
    for section, values in edit.items():
        saved[section].update(values)
    (run_dir / "config.json").write_text(json.dumps(saved))
    from subspace_optim.train.config import load_saved_config

    edited = load_saved_config(run_dir / "config.json")
    with pytest.raises(ConfigError, match="differs from the configuration its checkpoint was "
                                          f"saved with .*{change}"):
        loop.train(edited, run_dir, resume=True, progress=False)
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 3  # nothing changed


def test_an_edit_of_a_resumable_key_in_config_json_is_taken(tiny):
    cfg = tiny("output.name=extended")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=3)
    saved = json.loads((run_dir / "config.json").read_text())
    saved["training"]["steps"] = 10
    (run_dir / "config.json").write_text(json.dumps(saved))
    from subspace_optim.train.config import load_saved_config

    result = loop.train(load_saved_config(run_dir / "config.json"), run_dir, resume=True,
                        progress=False)
    assert result.steps == 10


def test_a_second_process_on_the_same_run_is_refused_with_the_holders_pid(tiny, tmp_path):
    """Point 11: two train processes with one output.name both ran and interleaved one
    metrics.jsonl. The run directory is locked by the process that trains it."""
    cfg = tiny("output.name=busy")
    run_dir = loop.run_directory(cfg, "b")
    loop.train(cfg, run_dir, progress=False, stop_after=3)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); "
         "os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _cli(tmp_path, resume=run_dir)
        assert result.exit_code == 2, result.output
        assert f"in use by another subspace-optim train (PID {holder.pid})" in \
            " ".join(result.output.split())
    finally:
        holder.kill()
        holder.wait()
    assert _cli(tmp_path, resume=run_dir).exit_code == 0  # free again


def test_sigterm_saves_at_the_step_boundary_and_exits_143(tiny, tmp_path, monkeypatch):
    """Point 12: SIGTERM (what schedulers send before a kill) ended the run without saving.
    It is now taken as Ctrl-C is: the step in progress completes, a checkpoint is saved, and
    the exit status is 143."""
    _interrupt_in_the_middle_of_step(monkeypatch, at_step=2, signum=signal.SIGTERM)
    args = ["train", "--no-progress", *[a for item in TINY for a in ("--set", item)],
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set",
            f"output.dir={tmp_path / 'runs'}", "--set", "output.name=term"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 143, result.output
    assert load_checkpoint(tmp_path / "runs" / "term" / "checkpoints")["step"] == 3


@pytest.mark.parametrize("setting,match", [
    ("file", "is a file, not a directory"),
    ("long", "output.name is 300 bytes long; the filesystem takes names of at most"),
])
def test_an_unusable_output_place_is_an_error_before_any_work(tmp_path, setting, match):
    """Point 13: output.dir naming a file, or a name longer than the filesystem allows,
    ended in raw tracebacks after the data and model were prepared."""
    if setting == "file":
        (tmp_path / "afile").write_text("x")
        result = _cli(tmp_path, f"output.dir={tmp_path / 'afile'}", "output.name=x")
    else:
        result = _cli(tmp_path, "output.name=" + "n" * 300)
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split())
    assert not (tmp_path / "cache").exists()  # nothing was prepared
