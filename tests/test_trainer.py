"""transformers' Trainer: the Trainer-ready form (``for_trainer``) with the learning rate and
weight decay of ``TrainingArguments``, ``param_groups`` with transformers' target-module
semantics, frozen PEFT weights left out, resume from a Trainer checkpoint, and the
layer-wise recipe's gradient-norm callback."""

from __future__ import annotations

import pytest
import torch

import subspace_optim as so

transformers = pytest.importorskip("transformers")

STEPS = 6
PROJECTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (64, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], logging_steps=1, save_steps=3, save_strategy="steps", seed=0,
        learning_rate=1e-3, lr_scheduler_type="constant", disable_tqdm=True, **kw)


def _trainer(out, model, **kw):
    args = _args(out, weight_decay=0.05)
    return transformers.Trainer(
        model=model, args=args, train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=so.for_trainer(args, "GaLoreAdamW", ["self_attn", "mlp"],
                                                rank=4, update_proj_gap=2), **kw)


def _groups_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in groups]


def test_param_groups_follow_transformers_target_modules():
    """A string is a regular expression on the whole name (transformers: a bare "attn"
    matches nothing in a LLaMA); a list's names match as a substring; "all-linear" is every
    linear layer but the head and embeddings; norms and biases lose weight decay."""
    from transformers.trainer_utils import check_target_module_exists

    model = _model()
    groups = so.param_groups(model, ["self_attn", "mlp"], rank=4)
    rest, quiet, projected = groups
    names = _groups_by_name(model, groups)
    assert len(names[2]) == 2 * len(PROJECTED)
    assert all(n.split(".")[-2] in PROJECTED and n.endswith("weight") for n in names[2])
    assert projected["rank"] == 4 and quiet["weight_decay"] == 0.0
    assert all("norm" in n for n in names[1]) and "weight_decay" not in rest
    assert sorted(sum(names, [])) == sorted(n for n, _ in model.named_parameters())
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for patterns in (["self_attn", "mlp"], r".*\.(q|v)_proj", ["up_proj", r".*\.k_proj"]):
        ours = {n.rsplit(".", 1)[0] for n in _groups_by_name(
            model, so.param_groups(model, patterns, rank=4))[-1]}
        theirs = {n for n in linear if check_target_module_exists(patterns, n)}
        assert ours == theirs, patterns
    with pytest.raises(ValueError, match="no trainable linear layer's name matches"):
        so.param_groups(model, "attn", rank=4)  # as transformers: no module is named attn
    everything = so.param_groups(model, "all-linear", rank=4)[-1]["params"]
    assert len(everything) == len(projected["params"])  # lm_head and embeddings excluded


def test_param_groups_take_per_pattern_keys_and_a_relative_rank():
    model = _model()
    groups = so.param_groups(model, {"self_attn": {"rank": 4, "scale": 0.5}, "mlp": 8},
                             update_proj_gap=3)
    attn, mlp = groups[-2:]
    assert (attn["rank"], attn["scale"], attn["update_proj_gap"]) == (4, 0.5, 3)
    assert (mlp["rank"], mlp["update_proj_gap"]) == (8, 3) and "scale" not in mlp
    assert len(attn["params"]) == 8 and len(mlp["params"]) == 6
    fraction = so.param_groups(model, "all-linear", rank=0.25)
    assert {g["rank"] for g in fraction[2:]} == {8}  # a quarter of 32, every matrix here
    so.GaLoreAdamW(groups)  # one optimizer, two ranks (two calls used to collide)


def test_param_groups_refuses_what_would_train_full_rank():
    model = _model()
    with pytest.raises(ValueError, match="rank"):
        so.param_groups(model, ["self_attn"])
    with pytest.raises(ValueError, match="no trainable linear layer's name matches"):
        so.param_groups(model, ["attention_blocks"], rank=4)


def test_peft_frozen_base_weights_are_left_out():
    """PEFT freezes the base weights: under "all-linear" they landed in the projected group
    (14 of 26). Frozen parameters are in no group now; LoRA's matrices (a dimension of 4)
    project at rank 2, and at rank 4 nothing could be projected, which is said."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "up_proj"], lora_alpha=8))
    groups = so.param_groups(model, "all-linear", rank=2)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    projected = [p for g in groups if "rank" in g for p in g["params"]]
    assert len(projected) == 12 and all(4 in p.shape for p in projected)  # the LoRA matrices
    so.GaLoreAdamW(groups)
    with pytest.raises(ValueError, match="has a dimension at most the rank"):
        so.param_groups(model, "all-linear", rank=4)


def test_a_matrix_no_larger_than_the_rank_stays_full_rank_with_a_warning():
    """Projected at a rank >= its smaller dimension a matrix keeps more state than AdamW;
    param_groups leaves it full rank and names it, and the optimizer warns when given one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    with pytest.warns(UserWarning, match=r"stay full rank .*1 \(8, 64\)"):
        groups = so.param_groups(model, "all-linear", rank=8)
    assert [p.shape for p in groups[-1]["params"]] == [(64, 64)]
    with pytest.warns(UserWarning, match=r"rank 8 is not below the smaller dimension"):
        so.GaLoreAdamW([{"params": [model[1].weight], "rank": 8}])


def test_build_gives_an_optimizer_in_one_call():
    model = _model()
    optimizer = so.build(model, "GaLoreAdamW", ["self_attn", "mlp"], rank=4, lr=2e-3,
                         weight_decay=0.1, update_proj_gap=50, state_bits=16)
    assert isinstance(optimizer, so.GaLoreAdamW)
    projected = optimizer.param_groups[-1]
    assert (projected["rank"], projected["update_proj_gap"], projected["state_bits"],
            projected["lr"], projected["weight_decay"]) == (4, 50, 16, 2e-3, 0.1)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # norms
    with pytest.raises(ValueError, match="did you mean 'GaLoreAdamW'"):
        so.build(model, "GaloreAdamW", rank=4)


def test_trainer_takes_learning_rate_and_weight_decay_and_resumes_exactly(tmp_path):
    """The Trainer-ready form alone (no hand-built "params"): the Trainer's learning rate
    and weight decay reach the groups, the projected state is where the patterns say, and
    a run resumed from a Trainer checkpoint ends with the same parameters."""
    whole = _trainer(tmp_path / "whole", _model())
    factory, kwargs = whole.optimizer_cls_and_kwargs
    whole.train()
    assert kwargs == {}  # nothing for the Trainer to pop or mutate
    groups = whole.optimizer.param_groups
    assert all(g["lr"] == 1e-3 or g["lr"] == pytest.approx(1e-3) for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05]
    state = whole.optimizer.state
    names = {id(p): n for n, p in whole.model.named_parameters()}
    projected = [names[id(p)] for p in state if "proj_basis" in state[p]]
    assert sorted(n.split(".")[-2] for n in projected) == sorted(PROJECTED * 2)
    shapes = {names[id(p)]: state[p]["exp_avg"].shape for p in state}
    assert 4 in shapes["model.layers.0.mlp.up_proj.weight"]  # rank-4 moments

    resumed = _trainer(tmp_path / "resumed", _model())
    half = tmp_path / "whole" / "checkpoint-3"
    resumed.train(resume_from_checkpoint=str(half))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name


def test_layerwise_recipe_logs_the_real_gradient_norm(tmp_path):
    from subspace_optim.trainer_callback import add_grad_norm_callback

    model = _model()
    optimizer = so.GaLoreAdamW(so.param_groups(model, "all-linear", rank=4), lr=1e-3)
    stepper = so.step_in_backward(optimizer, max_grad_norm=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=0.0),
                                   train_dataset=_Tokens(), optimizers=(optimizer, scheduler))
    add_grad_norm_callback(trainer, stepper)
    trainer.train()
    logged = [e["grad_norm"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == STEPS and all(v > 0 for v in logged)
    assert logged[-1] == pytest.approx(float(stepper.grad_norm))
    assert all(p.grad is None for p in model.parameters())


def test_layerwise_mode_warns_where_the_callers_clip_would_do_nothing(tmp_path):
    """Layer-wise mode under the Trainer's default max_grad_norm logged grad_norm 0.0 and
    clipped nothing, without a word."""
    from subspace_optim.trainer_callback import add_grad_norm_callback

    model = _model()
    optimizer = so.GaLoreAdamW(so.param_groups(model, "all-linear", rank=4), lr=1e-3)
    stepper = so.step_in_backward(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=1.0),
                                   train_dataset=_Tokens(), optimizers=(optimizer, scheduler))
    add_grad_norm_callback(trainer, stepper)
    with pytest.warns(UserWarning, match=r"max_grad_norm=1.0\) clips nothing in layer-wise"):
        trainer.train()
    with pytest.warns(UserWarning, match="sees none"):
        so.clip_grad_norm_(optimizer, 1.0)
