"""Group keys and values (hardening issue, points 3, 4 and 5): a misspelled key, a group
that projects nothing, and non-finite or mistyped values are refused or warned about."""

import math
import warnings

import pytest
import torch
from optim_db import OPTIMIZERS

import subspace_optim as so
from subspace_optim.optim.groups import near_miss
from subspace_optim.projectors.base import registered_group_keys


def _w(shape=(16, 32)):
    return torch.nn.Parameter(torch.randn(*shape))


def _typo(key: str) -> str:
    """One swap of neighbouring letters in the middle of the key (a typist's slip)."""
    i = max(1, len(key) // 2 - 1)
    while i + 1 < len(key) and key[i] == key[i + 1]:
        i += 1
    return key[:i] + key[i + 1] + key[i] + key[i + 2:]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_near_miss_of_any_known_key_names_both(name):
    """Every key the class reads and every projector key, misspelled by one swap, is refused
    with both names (before: accepted and ignored, so training used the default)."""
    record = OPTIMIZERS[name]
    keys = set(record.make([{"params": [_w()]}]).defaults) | {"rank"} | registered_group_keys()
    tested = 0
    for key in sorted(k for k in keys if len(k) >= 4):
        typo = _typo(key)
        if typo in keys:
            continue
        group = {"params": [_w()], "rank": 4, typo: 1}
        with pytest.raises(ValueError, match=rf"'{typo}': did you mean '{key}'"):
            record.make([group])
        tested += 1
    assert tested >= 15, tested


@pytest.mark.parametrize("group,typo,meant", [
    ({"rank": 4, "update_proj_gpa": 5}, "update_proj_gpa", "update_proj_gap"),
    ({"rnak": 32}, "rnak", "rank"),
    ({"rank": 4, "scael": 0.5}, "scael", "scale"),
])
def test_the_issue_examples_are_refused(group, typo, meant):
    with pytest.raises(ValueError, match=rf"'{typo}': did you mean '{meant}'"):
        so.GaLoreAdamW([{"params": [_w()], **group}])
    opt = so.GaLoreAdamW([{"params": [_w()], "rank": 2}])
    with pytest.raises(ValueError, match=rf"'{typo}'"):
        opt.add_param_group({"params": [_w()], **group})
    assert len(opt.param_groups) == 1


def test_unknown_keys_that_are_no_near_miss_are_accepted_as_in_torch():
    opt = so.GaLoreAdamW([{"params": [_w()], "rank": 4, "name": "attn", "lr_scale": 2.0,
                           "layer_id": 3}])
    assert opt.param_groups[0]["name"] == "attn"
    assert near_miss("lr_scale", {"scale", "lr"}) is None


def test_projection_keys_in_a_group_without_rank_warn():
    with pytest.warns(UserWarning, match=r"\['scale', 'update_proj_gap'\] configure a "
                                         r"projection, but the group has no 'rank'"):
        so.GaLoreAdamW([{"params": [_w()], "update_proj_gap": 5, "scale": 0.5},
                        {"params": [_w()], "rank": 2}])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_optimizer_that_projects_nothing_warns_once(name):
    """What transformers' Trainer passes by default: ``cls(model.parameters())``."""
    record = OPTIMIZERS[name]
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="no param group has 'rank', so nothing is projected") \
            as caught:
        record.make(list(model.parameters()) if record.rule != "flora_adafactor"
                    else [{"params": list(model.parameters())}])
    assert sum("nothing is projected" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record.make([{"params": [model[0].weight], "rank": 2}, {"params": [model[0].bias]}])


BAD_VALUES = [
    # (class, group keys, constructor keywords, expected message)
    (so.SubspaceAdamW, {}, {"lr": math.inf}, r"Invalid learning rate: inf"),
    (so.SubspaceAdamW, {}, {"weight_decay": math.inf}, r"Invalid weight_decay value: inf"),
    (so.SubspaceAdamW, {}, {"eps": math.inf}, r"Invalid epsilon value: inf"),
    (so.SubspaceAdamW, {}, {"lr": math.nan}, r"Invalid learning rate: nan"),
    (so.SubspaceAdamW, {"scale": math.inf}, {}, r"Invalid scale: inf"),
    (so.SubspaceAdamW, {"scale": "0.25"}, {}, r"Invalid scale: '0\.25'"),
    (so.SubspaceAdamW, {}, {"lr": "0.1"}, r"Invalid learning rate: '0\.1'"),
    (so.SubspaceAdamW, {}, {"state_bits": 8.0}, r"Invalid state_bits: 8\.0"),
    (so.SubspaceAdamW, {}, {"state_bits": True}, r"Invalid state_bits: True"),
    (so.SubspaceAdamW, {}, {"skip_nonfinite": 1}, r"Invalid skip_nonfinite: 1"),
    (so.QGaLoreAdamW, {"gamma_proj": math.inf, "quant_group_size": 64}, {},
     r"Invalid gamma_proj: inf"),
    (so.QGaLoreAdamW, {"quant_n_bit": 4.0}, {}, r"Invalid quant_n_bit: 4\.0"),
    (so.FloraAdamW, {"seed": 2**63}, {}, r"Invalid seed: 9223372036854775808"),
    (so.GrassAdamW, {"seed": 2**64}, {}, r"Invalid seed: "),
    (so.OnlineSubspaceAdamW, {"ortho_penalty": math.inf}, {}, r"Invalid ortho_penalty: inf"),
    (so.SubspaceAdafactor, {}, {"relative_step": "no"}, r"Invalid relative_step: 'no'"),
    (so.SubspaceAdafactor, {}, {"scale_parameter": 1}, r"Invalid scale_parameter: 1"),
    (so.SubspaceAdafactor, {}, {"lr": 1e-2, "relative_step": False, "warmup_init": "no"},
     r"Invalid warmup_init: 'no'"),
    (so.SubspaceAdafactor, {}, {"lr": math.inf, "relative_step": False},
     r"Invalid learning rate: inf"),
    (so.SubspaceAdafactor, {}, {"eps": (1e-30, math.inf)}, r"Invalid eps"),
    (so.SubspaceAdafactor, {}, {"clip_threshold": math.inf}, r"Invalid clip_threshold: inf"),
    (so.SubspaceAdafactor, {}, {"decay_rate": -math.inf}, r"Invalid decay_rate: -inf"),
    (so.FloraAdafactor, {}, {"lr": 1e-2, "factorize_second_moment": "yes"},
     r"Invalid factorize_second_moment: 'yes'"),
    (so.SubspaceLion, {}, {"lr": math.inf}, r"Invalid learning rate: inf"),
]


@pytest.mark.parametrize("cls,group,kwargs,match", BAD_VALUES,
                         ids=[f"{c.__name__}-{next(iter({**g, **k}))}-{i}"
                              for i, (c, g, k, _) in enumerate(BAD_VALUES)])
def test_bad_values_are_refused_naming_key_and_value(cls, group, kwargs, match):
    """At construction, and in add_param_group (where the group is dropped again)."""
    projected = cls is not so.FloraAdafactor
    base = {"params": [_w()], **({"rank": 4} if projected else {})}
    with pytest.raises(ValueError, match=match):
        cls([{**base, **group}], **kwargs)
    if kwargs:  # constructor keywords are group defaults: also refused as group values
        ok = {"lr": 1e-2, "relative_step": False} if cls is so.SubspaceAdafactor and \
            "relative_step" not in kwargs else {}
        opt = cls([{"params": [_w()], **({"rank": 2} if projected else {})}],
                  **({"lr": 1e-2} if cls is so.FloraAdafactor else ok))
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({**base, **group, **kwargs})
        assert len(opt.param_groups) == 1
