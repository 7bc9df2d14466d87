"""Every bad input gets a clear error that names the value (table-driven)."""

import pytest
import torch

from subspace_optim import GaLoreAdamW, SubspaceAdamW


def _params():
    return [torch.nn.Parameter(torch.randn(32, 64))]


BAD_CONSTRUCTOR = [
    ("lr", {"lr": -1.0}, r"Invalid learning rate: -1\.0"),
    ("lr-type", {"lr": "0.1"}, r"Invalid learning rate: '0\.1'"),
    ("beta1", {"betas": (1.0, 0.999)}, r"beta parameter at index 0: 1\.0"),
    ("beta2", {"betas": (0.9, -0.1)}, r"beta parameter at index 1: -0\.1"),
    ("betas-len", {"betas": (0.9,)}, r"Invalid betas: \(0\.9,\)"),
    ("eps", {"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
    ("weight_decay", {"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1"),
    ("convention", {"convention": "keras"}, r"Invalid convention: 'keras'"),
    ("correct_bias", {"correct_bias": "yes"}, r"Invalid correct_bias: 'yes'"),
]

BAD_GROUP = [
    ("rank-zero", {"rank": 0}, r"Invalid rank: 0 "),
    ("rank-negative", {"rank": -3}, r"Invalid rank: -3 "),
    ("rank-float", {"rank": 2.5}, r"Invalid rank: 2\.5"),
    ("rank-bool", {"rank": True}, r"Invalid rank: True"),
    ("rank-too-large", {"rank": 33}, r"rank: 33 is larger .* shape \(32, 64\)"),
    ("gap-zero", {"rank": 4, "update_proj_gap": 0}, r"Invalid update_proj_gap: 0"),
    ("gap-float", {"rank": 4, "update_proj_gap": 1.5}, r"Invalid update_proj_gap: 1\.5"),
    ("scale-zero", {"rank": 4, "scale": 0}, r"Invalid scale: 0"),
    ("scale-negative", {"rank": 4, "scale": -0.25}, r"Invalid scale: -0\.25"),
    ("proj_type", {"rank": 4, "proj_type": "full"}, r"Invalid proj_type: 'full'"),
    ("projector", {"rank": 4, "projector": "pca"}, r"Unknown projector: 'pca'"),
]


@pytest.mark.parametrize("cls", [SubspaceAdamW, GaLoreAdamW])
@pytest.mark.parametrize("kwargs,match", [c[1:] for c in BAD_CONSTRUCTOR],
                         ids=[c[0] for c in BAD_CONSTRUCTOR])
def test_bad_constructor_value(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(_params(), **kwargs)


@pytest.mark.parametrize("group,match", [c[1:] for c in BAD_GROUP], ids=[c[0] for c in BAD_GROUP])
def test_bad_group_value(group, match):
    with pytest.raises(ValueError, match=match):
        SubspaceAdamW([{"params": _params(), **group}])


def test_bad_group_added_later_is_rejected_and_not_kept():
    opt = SubspaceAdamW(_params())
    with pytest.raises(ValueError, match="Invalid rank: 0"):
        opt.add_param_group({"params": _params(), "rank": 0})
    assert len(opt.param_groups) == 1


def test_rank_equal_to_the_smaller_dimension_is_allowed():
    SubspaceAdamW([{"params": _params(), "rank": 32}])


def test_sparse_gradient_is_a_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SubspaceAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter of shape \(10, 4\)\)"):
        opt.step()


def test_complex_parameter_is_a_clear_error():
    p = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = SubspaceAdamW([p])
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_parameter_without_grad_is_skipped_untouched():
    w = torch.nn.Parameter(torch.randn(8, 6))
    frozen = torch.nn.Parameter(torch.randn(8, 6))
    opt = SubspaceAdamW([{"params": [w, frozen], "rank": 2, "update_proj_gap": 2}])
    for step in range(5):
        w.grad = torch.randn(8, 6)
        frozen.grad = torch.randn(8, 6) if step < 2 else None  # frozen after two steps
        if step == 2:
            snapshot = {k: v.clone() if torch.is_tensor(v) else v
                        for k, v in opt.state[frozen].items()}
            value = frozen.detach().clone()
        opt.step()
    assert opt.state[w]["step"] == 5
    for key, v in snapshot.items():
        assert torch.equal(opt.state[frozen][key], v) if torch.is_tensor(v) else \
            opt.state[frozen][key] == v
    assert torch.equal(frozen, value)
    never = torch.nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [never]})
    opt.step()
    assert never not in opt.state


def test_grad_scaler_skips_inf_steps_without_touching_state():
    model = torch.nn.Linear(8, 8)
    opt = SubspaceAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def step(poison):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    step(poison=False)
    before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
              for p in model.parameters()}
    weights = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    step(poison=True)
    assert scaler.get_scale() < scale
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
        for key, v in before[id(p)].items():
            assert torch.equal(opt.state[p][key], v) if torch.is_tensor(v) else \
                opt.state[p][key] == v
    step(poison=False)
    assert opt.state[model.weight]["step"] == 2
