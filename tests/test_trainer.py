"""transformers' Trainer with ``param_groups``: projected state where the patterns say,
resume from a Trainer checkpoint, and the layer-wise recipe's gradient-norm callback."""

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
    groups = so.param_groups(model, ["self_attn", "mlp"], rank=4, update_proj_gap=2)
    return transformers.Trainer(
        model=model, args=_args(out), train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(so.GaLoreAdamW, {"params": groups, "lr": 1e-3}), **kw)


def test_param_groups_project_attention_and_mlp_only():
    model = _model()
    rest, projected = so.param_groups(model, ["self_attn", "mlp"], rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    projected_names = sorted(names[id(p)] for p in projected["params"])
    assert len(projected_names) == 2 * len(PROJECTED)
    assert all(n.split(".")[-2] in PROJECTED and n.endswith("weight") for n in projected_names)
    assert projected["rank"] == 4
    assert {id(p) for p in rest["params"]} | {id(p) for p in projected["params"]} == set(names)
    everything = so.param_groups(model, "all-linear", rank=4)[1]["params"]
    assert len(everything) == len(projected["params"])  # lm_head and embeddings excluded
    regex = so.param_groups(model, r".*\.(q|v)_proj", rank=4)[1]["params"]
    assert len(regex) == 4


def test_param_groups_refuses_what_would_train_full_rank():
    model = _model()
    with pytest.raises(ValueError, match="rank"):
        so.param_groups(model, ["self_attn"])
    with pytest.raises(ValueError, match="no linear layer's name matches"):
        so.param_groups(model, ["attention_blocks"], rank=4)


def test_trainer_projects_and_resumes_to_the_same_parameters(tmp_path):
    whole = _trainer(tmp_path / "whole", _model())
    whole.train()
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
