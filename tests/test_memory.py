"""optimizer_state_bytes counts what is really held."""

import pytest
import torch

import subspace_optim as so
from subspace_optim import GaLoreAdamW, SubspaceAdamW, optimizer_state_bytes


def test_galore_state_bytes_match_the_analytic_figure():
    """4096 x 1024 at rank 128, right side: moments 2 x (4096 x 128), basis 128 x 1024."""
    w = torch.nn.Parameter(torch.zeros(4096, 1024))
    opt = GaLoreAdamW([{"params": [w], "rank": 128}])
    w.grad = torch.randn(4096, 1024)
    opt.step()
    fp32 = 4
    expected = (2 * 4096 * 128 + 128 * 1024) * fp32
    assert optimizer_state_bytes(opt) == expected == 4_718_592
    full = SubspaceAdamW([torch.nn.Parameter(torch.zeros(4096, 1024))])
    full.param_groups[0]["params"][0].grad = torch.randn(4096, 1024)
    full.step()
    assert optimizer_state_bytes(full) == 2 * 4096 * 1024 * fp32
    assert optimizer_state_bytes(opt) / optimizer_state_bytes(full) < 0.15


def test_state_bytes_follow_dtype():
    w = torch.nn.Parameter(torch.zeros(64, 32, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 8}])
    w.grad = torch.randn(64, 32, dtype=torch.bfloat16)
    opt.step()
    assert optimizer_state_bytes(opt) == (2 * 64 * 8 + 8 * 32) * 2


def test_state_tensors_own_only_their_elements():
    """Every state tensor's storage is its own size: a basis sliced from LAPACK's SVD factor
    used to keep the whole factor alive (3x the basis at 2048 x 768, rank 256), memory that
    optimizer_state_bytes, counting elements, did not see."""
    from optim_db import PROJECTORS

    for name, record in PROJECTORS.items():
        wide = torch.nn.Parameter(torch.randn(48, 96))
        tall = torch.nn.Parameter(torch.randn(96, 48))
        opt = getattr(so, record.named)([{"params": [wide, tall], "rank": 16,
                                          **record.group()}])
        for _ in range(2):
            wide.grad, tall.grad = torch.randn_like(wide), torch.randn_like(tall)
            opt.step()
        for p in (wide, tall):
            for key, value in opt.state[p].items():
                if torch.is_tensor(value):
                    owned = value.numel() * value.element_size()
                    assert value.untyped_storage().nbytes() == owned, (name, key)


def test_a_peers_tensor_subclass_state_is_counted_from_its_inner_tensors():
    """torchao keeps 8-bit moments as a tensor subclass that poses as float32: its bytes are
    its codes (1 per element) and its scales (one float32 per block of 256), not 4 per
    element."""
    optim = pytest.importorskip("torchao.optim")
    w = torch.nn.Parameter(torch.randn(512, 512))
    opt = optim.AdamW8bit([w])
    w.grad = torch.randn_like(w)
    opt.step()
    codes_and_scales = 2 * (512 * 512 + 4 * 512 * 512 // 256)
    held = so.optimizer_state_bytes(opt)
    assert codes_and_scales <= held <= codes_and_scales + 2 * 256 * 4 + 8  # maps, step
