"""A group key changed between steps (issue 19, point 1): for every optimizer class and each
projection key, the change either takes effect at the next step or is refused with an
error that names the key; the process never crashes. Before, a changed ``rank`` handed
moments of the old shape to ``torch._fused_adamw_``, which does not check shapes: NaN
weights, then heap corruption (rc 134/139)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from optim_db import OPTIMIZERS

import subspace_optim as so

WORKER = Path(__file__).parent / "group_change_worker.py"
# Keys whose change re-creates the parameters' state (the rest take effect as they are).
LAYOUT = {"rank", "projector", "proj_type", "state_bits", "quant_group_size"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_changing_any_group_key_between_steps_works_or_names_the_key(name):
    if OPTIMIZERS[name].bnb:
        pytest.importorskip("bitsandbytes")
    result = subprocess.run([sys.executable, str(WORKER), name], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) > 30
    for r in reports:
        if r["outcome"] == "error":
            assert r["type"] in ("ValueError", "RuntimeError"), r
            assert repr(r["key"]) in r["message"] or r["key"] in r["message"], r
        else:
            assert r["finite"], r
            if r["key"] in ("update_proj_gap", "scale", "selection"):
                assert not r["recreated"], r
    # Bad values are refused, not trained with.
    bad = {("update_proj_gap", 0), ("update_proj_gap", -1), ("rank", 0), ("projector", "nope"),
           ("state_bits", 4)}
    refused = {(r["key"], r["value"]) for r in reports if r["outcome"] == "error"}
    assert bad <= refused


def test_a_changed_rank_takes_effect_at_the_next_step_with_a_warning():
    w = torch.nn.Parameter(torch.randn(32, 48))
    opt = so.GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0]["rank"] = 8
    with pytest.warns(UserWarning, match=r"'rank' 4 -> 8 .* created anew"):
        opt.step()
    assert opt.state[w]["exp_avg"].shape == (8, 48)  # left side: 32 < 48
    assert opt.state[w]["step"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # nothing changed since: no warning


def test_a_bad_value_set_between_steps_names_the_key_and_keeps_the_state():
    w = torch.nn.Parameter(torch.randn(32, 48))
    opt = so.GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2)
    w.grad = torch.randn_like(w)
    opt.step()
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w].items()}
    opt.param_groups[0]["update_proj_gap"] = 0
    with pytest.raises(ValueError, match="'update_proj_gap' changed since the last step"):
        opt.step()
    assert opt.state[w]["step"] == before["step"]
    assert torch.equal(opt.state[w]["exp_avg"], before["exp_avg"])


def test_replacing_p_data_by_another_shape_is_refused_not_a_heap_corruption():
    """torch.optim.AdamW raises a size mismatch here; the fused kernel used to write past
    the old moments."""
    w = torch.nn.Parameter(torch.randn(32, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.SubspaceAdamW([w], lr=1e-2)
    w.grad = torch.randn_like(w)
    opt.step()
    w.data = torch.randn(64, 48)
    w.grad = torch.randn_like(w)
    with pytest.raises(RuntimeError, match=r"'exp_avg' has shape \(32, 48\).*needs \(64, 48\)"):
        opt.step()
