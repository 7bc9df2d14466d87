"""Checkpoints: weights_only loading, dtypes kept, and bit-exact resume in a fresh process."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subspace_optim import GaLoreAdamW, SubspaceAdamW

WORKER = Path(__file__).with_name("resume_worker.py")


def _worker(*args):
    subprocess.run([sys.executable, str(WORKER), *map(str, args)], check=True)


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    """Stop at step 7 (refreshes at 0, 3, 6; the next at 9 happens after resume)."""
    _worker(tmp_path / "full.pt", 20)
    _worker(tmp_path / "unused", 20, "--save-at", 7, tmp_path / "ckpt.pt")
    _worker(tmp_path / "resumed.pt", 20, "--resume", tmp_path / "ckpt.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for pid, state in full["optim"]["state"].items():
        for key, value in state.items():
            other = resumed["optim"]["state"][pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert full["optim"]["state"][1]["step"] == 20


def _trained_optimizer(dtype=torch.float32):
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(8, dtype=dtype))
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 3, "update_proj_gap": 2}])
    for _ in range(3):
        w.grad = torch.randn_like(w)
        b.grad = torch.randn_like(b)
        opt.step()
    return opt, w, b


def test_state_dict_loads_with_weights_only(tmp_path):
    opt, w, b = _trained_optimizer()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    assert set(loaded["state"][1]) == {"step", "exp_avg", "exp_avg_sq", "proj_basis"}
    assert all(isinstance(v, (int, float, str, bool, tuple, list)) or v is None
               for g in loaded["param_groups"] for k, v in g.items() if k != "params")


def test_load_keeps_every_state_dtype(tmp_path):
    """torch's loader would cast these to the parameter's bf16; ours keeps them."""
    opt, w, b = _trained_optimizer(torch.bfloat16)
    state = opt.state[w]
    state["proj_codes"] = torch.arange(10, dtype=torch.uint8)
    state["proj_seed"] = torch.tensor(2**62 + 1, dtype=torch.int64)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    torch.save(opt.state_dict(), tmp_path / "o.pt")

    fresh, w2, _ = _trained_optimizer(torch.bfloat16)
    fresh.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    restored = fresh.state[w2]
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        if torch.is_tensor(value):
            assert restored[key].dtype == value.dtype, key
            assert torch.equal(restored[key], value), key
        else:
            assert restored[key] == value


def test_plain_torch_loader_would_have_cast(tmp_path):
    """Guards the test above: it must exercise a real hazard of torch's default."""
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([w])
    w.grad = torch.randn_like(w)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["proj_codes"] = torch.arange(4, dtype=torch.uint8)
    opt.load_state_dict(sd)
    assert opt.state[w]["proj_codes"].dtype == torch.bfloat16


def test_a_state_dict_of_another_precision_is_refused_with_the_reason():
    """An fp32 checkpoint into a bf16 model: the moments (state_bits=None) and the basis
    are kept in the parameter's dtype, so the first step failed on mixed dtypes (issue 19,
    point 3). Refused at load; state_bits=32 moments load into either."""
    opt32, _, _ = _trained_optimizer(torch.float32)
    fresh, w, _ = _trained_optimizer(torch.bfloat16)
    before = {k: v.clone() for k, v in fresh.state[w].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"'exp_avg' is torch.float32 where the parameter is "
                                         r"torch.bfloat16.*saved from a model of another"):
        fresh.load_state_dict(opt32.state_dict())
    for key, value in before.items():  # left as it was
        assert torch.equal(fresh.state[w][key], value)


def test_loaded_optimizer_continues_identically():
    opt, w, b = _trained_optimizer()
    twin_opt, w2, b2 = _trained_optimizer()
    with torch.no_grad():
        w2.copy_(w)
        b2.copy_(b)
    # deepcopy stands in for save + load: like torch's, a state_dict holds references.
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(4):  # crosses the refresh at step 4
        g, gb = torch.randn_like(w), torch.randn_like(b)
        w.grad, b.grad, w2.grad, b2.grad = g, gb, g.clone(), gb.clone()
        opt.step()
        twin_opt.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


@pytest.mark.gpu
def test_state_follows_the_parameter_to_cuda(tmp_path):
    opt, w, b = _trained_optimizer()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    wc = torch.nn.Parameter(w.detach().cuda())
    bc = torch.nn.Parameter(b.detach().cuda())
    gpu_opt = SubspaceAdamW([{"params": [bc]}, {"params": [wc], "rank": 3}])
    gpu_opt.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert gpu_opt.state[wc]["proj_basis"].device.type == "cuda"
    assert gpu_opt.state[wc]["exp_avg"].dtype == torch.float32
