"""The op seam: every op is a torch.library custom op with a fake (meta) implementation that
checks shapes and dtypes, its PyTorch implementation is what the library runs on a CPU, and
SUBSPACE_OPTIM_KERNELS picks the implementation or says why it cannot."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from subspace_optim import ops
from subspace_optim.quant import quantize_groupwise
from subspace_optim.quant.blockwise import quantize_blockwise_8bit


def _packed(rows, cols, bits=4, group=16):
    codes, scales, zeros = quantize_groupwise(torch.randn(rows, cols), bits, group)
    return codes, scales, zeros


def _cases():
    """op name -> (args, mutated argument indices) for a 12 x 20 weight at rank 3."""
    torch.manual_seed(0)
    w, g = torch.randn(12, 20), torch.randn(12, 20)
    low_r, basis_r = torch.randn(12, 3), torch.randn(3, 20)  # right side
    codes, scales, zeros = _packed(3, 20)
    cases = {
        "projected_adamw_update": ((w.clone(), low_r, basis_r, torch.zeros(12, 3),
                                    torch.zeros(12, 3), 1, 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.25,
                                    True, False, True, False), (0, 3, 4)),
        "int4_project": ((g, codes, scales, zeros, 3, True, 4, 16), ()),
        "int4_project_back_": ((w.clone(), low_r, codes, scales, zeros, True, 4, 16,
                                torch.float32, 0.5, 0.9), (0,)),
        "grass_gather": ((g, torch.tensor([1, 4, 7], dtype=torch.int32), torch.rand(3) + 0.5,
                          False), ()),
        "grass_scatter_update_": ((w.clone(), torch.randn(3, 20),
                                   torch.tensor([1, 4, 7], dtype=torch.int32),
                                   torch.rand(3) + 0.5, False, -0.1, 0.99), (0,)),
        "flora_project": ((g, torch.tensor(7), 3, True), ()),
        "flora_project_back_": ((w.clone(), low_r, torch.tensor(7), True, 0.5, 0.9), (0,)),
        "flora_matrix": ((torch.tensor(7), torch.empty(0), 3, 20, 3), ()),
        "int8_sr_store_": ((torch.zeros(12, 20, dtype=torch.uint8), torch.ones(1),
                            torch.zeros(1, dtype=torch.uint8), w, 5, 3, 256), (0, 1, 2)),
    }
    try:
        m_codes, m_abs = quantize_blockwise_8bit(torch.zeros(64, 80), signed=True)
        v_codes, v_abs = quantize_blockwise_8bit(torch.zeros(64, 80), signed=False)
        cases["blockwise8_adamw_update"] = ((torch.randn(64, 80), m_codes, m_abs, v_codes,
                                             v_abs, 1, 0.9, 0.999, 1e-8, False, True, False),
                                            (1, 2, 3, 4))
    except ImportError:  # bitsandbytes absent: the 8-bit op is not exercised
        pass
    return cases


def test_every_declared_op_has_a_case():
    assert set(ops.declared()) - set(_cases()) <= {"blockwise8_adamw_update"}


def _clone(args):
    return [a.clone() if torch.is_tensor(a) else a for a in args]


@pytest.mark.parametrize("name", sorted(_cases()))
def test_the_custom_op_runs_the_pytorch_implementation(name):
    args, mutated = _cases()[name]
    direct, through_op = _clone(args), _clone(args)
    out_direct = getattr(ops, name)(*direct)
    out_op = getattr(torch.ops.subspace_optim, name)(*through_op)
    if out_direct is not None:
        torch.testing.assert_close(out_op, out_direct, rtol=0, atol=0)
    for i in mutated:
        torch.testing.assert_close(through_op[i], direct[i], rtol=0, atol=0)
        assert not torch.equal(direct[i], args[i])  # the case does mutate it


@pytest.mark.parametrize("name", sorted(_cases()))
def test_the_fake_implementation_gives_the_output_shape(name):
    args, _ = _cases()[name]
    real = getattr(ops, name)(*_clone(args))
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
        out = getattr(torch.ops.subspace_optim, name)(*fake_args)
    if real is None:
        assert out is None
    else:
        assert out.shape == real.shape and out.dtype == real.dtype


def test_a_fake_implementation_refuses_a_mismatched_basis():
    args, _ = _cases()["projected_adamw_update"]
    args = list(args)
    args[2] = torch.randn(3, 21)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=r"basis of shape \(3, 21\)"):
        torch.ops.subspace_optim.projected_adamw_update(
            *[mode.from_tensor(a) if torch.is_tensor(a) else a for a in args])


# --------------------------------------------------------------------------- the setting
def test_the_default_setting_uses_pytorch_on_the_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV, raising=False)
    assert ops.setting() == "auto"
    assert all(ops.backend(name, torch.device("cpu")) == "torch" for name in ops.declared())


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv(ops.ENV, "cuda")
    with pytest.raises(ValueError, match=r"SUBSPACE_OPTIM_KERNELS='cuda' is not a kernel "
                                         r"setting \(expected one of \('auto', 'torch', "
                                         r"'triton'\)\)"):
        ops.backend("grass_gather", torch.device("cpu"))


def test_forcing_triton_on_a_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(ops.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        ops.backend("grass_gather", torch.device("cpu"))


def test_torch_setting_forces_pytorch(monkeypatch):
    monkeypatch.setenv(ops.ENV, "torch")
    assert ops.backend("projected_adamw_update", torch.device("cuda")) == "torch"


def test_registering_a_kernel_for_an_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        ops.register_triton("no_such_op")(lambda: None)
