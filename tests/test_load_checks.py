"""load_state_dict checks what it loads before changing anything (hardening issue, point 6)."""

import copy

import pytest
import torch

import subspace_optim as so


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def _groups(model, **keys):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": vectors}, {"params": matrices, "rank": 4, "update_proj_gap": 2, **keys}]


def _steps(model, opt, n=3):
    gen = torch.Generator().manual_seed(3)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
        opt.step()


def _snapshot(opt):
    return copy.deepcopy((opt.state_dict()["state"], opt.param_groups[1]["lr"],
                          [sorted(g) for g in opt.param_groups]))


def _assert_refused_and_usable(opt, model, bad, match):
    """The load is refused with ``match``; state and groups are as before; steps still run."""
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    after = _snapshot(opt)
    assert before[1:] == after[1:]
    for pid, state in before[0].items():
        for key, value in state.items():
            other = after[0][pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    steps = opt.state[model[0].weight]["step"]
    _steps(model, opt, 1)
    assert opt.state[model[0].weight]["step"] == steps + 1


def test_a_galore_torch_state_dict_is_refused_and_the_optimizer_stays_usable():
    galore_torch = pytest.importorskip("galore_torch")
    model = _model()
    ref_model = _model()
    theirs = galore_torch.GaLoreAdamW(_groups(ref_model, scale=0.25, proj_type="std"), lr=1e-2)
    _steps(ref_model, theirs)
    ours = so.GaLoreAdamW(_groups(model), lr=1e-2)
    _steps(model, ours)
    _assert_refused_and_usable(ours, model, theirs.state_dict(),
                               r"holds a GaLoreProjector object.*galore-torch")


def test_another_rule_is_refused():
    """AdamW into Lion loaded silently before; the marker names both."""
    model = _model()
    adamw = so.SubspaceAdamW(_groups(model))
    _steps(model, adamw)
    lion = so.SubspaceLion(_groups(model))
    _steps(model, lion)
    _assert_refused_and_usable(lion, model, adamw.state_dict(),
                               r"saved by SubspaceAdamW \(rule 'adamw'\); SubspaceLion")


def test_another_rule_without_the_marker_is_refused_by_its_keys():
    """A Lion state dict (no 'eps') fed to AdamW failed later with KeyError: 'eps'."""
    model = _model()
    lion = so.SubspaceLion(_groups(model))
    _steps(model, lion)
    state_dict = lion.state_dict()
    del state_dict["subspace_optim"]
    adamw = so.SubspaceAdamW(_groups(model))
    _steps(model, adamw)
    _assert_refused_and_usable(adamw, model, state_dict, r"lacks \['correct_bias', 'eps'\]|"
                                                         r"lacks \['.*eps.*'\]")


def test_a_torch_adamw_state_dict_would_switch_projection_off():
    """Its groups (same parameters, regrouped as ours) have torch's flags and no 'rank'."""
    model = _model()
    plain = torch.optim.AdamW(model.parameters())
    _steps(model, plain)
    group = plain.state_dict()["param_groups"][0]
    state_dict = {"state": {}, "param_groups": [{**group, "params": [0, 1]},
                                                {**group, "params": [2, 3]}]}
    ours = so.SubspaceAdamW(_groups(model))
    _steps(model, ours)
    _assert_refused_and_usable(ours, model, state_dict, r"\['amsgrad', 'decoupled_weight_decay'"
                                                        r"\], keys of another optimizer")
    for g in state_dict["param_groups"]:
        del g["amsgrad"], g["decoupled_weight_decay"]
        g.update(correct_bias=True, convention="torch")
    _assert_refused_and_usable(ours, model, state_dict, r"group 1 is projected here \(rank 4\) "
                                                        r"but not in the state dict")


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["param_groups"][1].update(rank=0), r"param group 1: Invalid rank: 0"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), r"param group 0: Invalid learning rate"),
    (lambda sd: sd["param_groups"][1].update(projector="pca"), r"Unknown projector: 'pca'"),
    (lambda sd: sd["param_groups"][1].update(rank=64), r"rank: 64 is larger"),
    (lambda sd: sd["param_groups"].pop(), r"1 parameter groups, this optimizer 2"),
    (lambda sd: sd["state"][2].update(exp_avg=torch.zeros(3, 3)),
     r"parameter 2 \(shape \(32, 16\)\): 'exp_avg' has shape \(3, 3\) where this optimizer "
     r"keeps \(32, 4\)"),
    (lambda sd: sd["state"][1].update(step=1.5), r"'step' is 1\.5"),
    (lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(4)),
     r"key 'momentum_buffer', which SubspaceAdamW never writes"),
    (lambda sd: sd.pop("state"), r"not an optimizer state dict"),
], ids=["rank0", "negative-lr", "projector", "rank-too-large", "groups", "shape", "step",
        "foreign-key", "structure"])
def test_bad_values_inside_a_state_dict_are_refused(edit, match):
    model = _model()
    opt = so.SubspaceAdamW(_groups(model))
    _steps(model, opt)
    bad = copy.deepcopy(opt.state_dict())
    edit(bad)
    _assert_refused_and_usable(opt, model, bad, match)


def test_a_state_dict_of_a_sibling_class_with_the_same_rule_loads():
    """GaLoreAdamW and SubspaceAdamW share the AdamW rule; the groups carry the settings."""
    model = _model()
    galore = so.GaLoreAdamW(_groups(model))
    _steps(model, galore)
    twin = so.SubspaceAdamW(_groups(model))
    twin.load_state_dict(copy.deepcopy(galore.state_dict()))
    assert twin.param_groups[1]["convention"] == "galore"


def test_a_state_dict_loads_twice():
    """torch's __setstate__ adds a 'differentiable' default that no group holds; a second
    load (transformers' Trainer through accelerate loads again on resume) must not then
    refuse the groups."""
    model = _model()
    opt = so.GaLoreAdamW(_groups(model))
    _steps(model, opt)
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == saved["param_groups"]
