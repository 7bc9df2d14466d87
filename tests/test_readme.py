"""Every code block of the README runs as pasted.

Python blocks run in order in one namespace (the README says they form one session), in a
temporary working directory. Shell blocks run line by line through bash in another; the
training commands get settings that make them tiny (a smaller model, less data, 4 steps),
added after the README's own, so that the README's commands are what runs. Three things are
not run here, each for a stated reason: ``pip install`` (CI's fresh environment runs the
README's install lines itself, ``.ci/run``), ``pytest`` (this is the test suite), and
``text`` blocks (sample output and usage synopses, not commands).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("typer")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TINY = ["model_config.hidden_size=64", "model_config.num_hidden_layers=1",
        "model_config.num_attention_heads=2", "model_config.intermediate_size=128",
        "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=30000",
        "data.max_val_bytes=10000", "training.batch_size=4", "training.warmup_steps=1",
        "training.steps=4", "training.eval_every=2", "training.eval_batches=1",
        "training.checkpoint_every=2", "training.log_every=2"]
TINY_STEPS_ON_RESUME = 6


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def shell_commands() -> list[str]:
    """The README's shell commands, each as it would be typed (``\\`` continuations
    joined), without the install prefix CI runs itself."""
    commands = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("pip install"):
                _, _, line = line.partition("&&")
                line = line.strip()
            if line and line != "pytest":
                commands.append(line)
    return commands


def tiny(command: str) -> str:
    """``command`` with the tiny settings: after a training command's own ``--set``s (on a
    resume, which takes no model settings, a shorter ``training.steps`` instead)."""
    words = shlex.split(command)
    if "train" not in words and "compare" not in words:
        return command
    if "--resume" in words:
        return re.sub(r"training\.steps=\d+", f"training.steps={TINY_STEPS_ON_RESUME}", command)
    return command + "".join(f" --set {shlex.quote(s)}" for s in TINY)


def test_the_readme_has_code_to_run():
    assert len(blocks("python")) >= 5
    assert any(c.startswith("subspace-optim train") for c in shell_commands())
    assert any("compare" in c for c in shell_commands())


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, body in enumerate(blocks("python")):
        try:
            exec(compile(body, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {i + 1} failed:\n{body}") from error


@pytest.fixture(scope="module")
def shell_dir(tmp_path_factory):
    """One working directory for the shell commands, which build on each other (a run
    that a later command resumes)."""
    return tmp_path_factory.mktemp("readme-shell")


@pytest.mark.parametrize("command", shell_commands())
def test_every_shell_command_runs(command, shell_dir):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", tiny(command)], cwd=shell_dir, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (tiny(command), result.stdout[-3000:],
                                    result.stderr[-3000:])
