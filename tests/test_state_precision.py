"""Optimizer-state precision (state_bits): 8-bit block-wise, bf16, fp32."""

import io
import sys

import pytest
import torch
from references import gradient_stream

import subspace_optim as so
from subspace_optim.optim.moments import MIN_8BIT_SIZE

pytest.importorskip("bitsandbytes")

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def _moment_bytes(state):
    return sum(state[k].numel() * state[k].element_size() for k in MOMENT_KEYS if k in state)


def test_8bit_states_cost_at_most_1_05_byte_per_moment_element():
    """4096 x 4096 at rank 1024 (right side: two 4096 x 1024 moments). Grass top-k selects
    the subspace so that no 4096 x 4096 SVD runs in CI; the state format is the same."""
    w = torch.nn.Parameter(torch.zeros(4096, 4096))
    opt = so.GaLoreAdamW8bit([{"params": [w], "rank": 1024, "projector": "grass",
                               "selection": "topk"}])
    w.grad = torch.randn(4096, 4096)
    opt.step()
    state = opt.state[w]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    elements = 2 * 4096 * 1024
    assert _moment_bytes(state) / elements <= 1.05
    projector_bytes = so.optimizer_state_bytes(opt) - _moment_bytes(state)
    assert projector_bytes <= 8 * 1024 + 8  # indices, scales and seed only


def _regression(state_bits, steps=200, shape=(128, 256), rank=64):
    torch.manual_seed(0)
    wstar = torch.randn(shape[0], 8) @ torch.randn(8, shape[1]) / 8
    layer = torch.nn.Linear(shape[1], shape[0], bias=False)
    opt = so.SubspaceAdamW([{"params": [layer.weight], "rank": rank, "update_proj_gap": 50,
                             "scale": 1.0}], lr=1e-2, weight_decay=0.0, state_bits=state_bits)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, shape[1], generator=gen)
        y = x @ wstar.T + 0.1 * torch.randn(64, shape[0], generator=gen)
        loss = torch.nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), opt.state[layer.weight]


@pytest.mark.parametrize("bits", [8, 16])
def test_low_precision_states_end_within_5_percent_of_fp32(bits):
    loss32, _ = _regression(32)
    loss_low, state = _regression(bits)
    expected = torch.uint8 if bits == 8 else torch.bfloat16
    assert state["exp_avg"].dtype == expected  # 64 x 256 moments: large enough to quantise
    assert abs(loss_low - loss32) <= 0.05 * loss32, (loss_low, loss32)


def test_small_moments_stay_32_bit():
    w = torch.nn.Parameter(torch.randn(40, 30))
    opt = so.GaLoreAdamW8bit([{"params": [w], "rank": 4}])
    w.grad = torch.randn(40, 30)
    opt.step()
    assert opt.state[w]["exp_avg"].numel() < MIN_8BIT_SIZE
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    assert "exp_avg_absmax" not in opt.state[w]


def test_8bit_full_rank_odd_size_tracks_fp32_adamw():
    """4099 elements: not a multiple of the 256 block. The 8-bit run follows the fp32 one
    within the blockwise quantisation error: for Adam, whose step is at most lr per
    coordinate, 30 steps of lr 1e-3 differ by far less than 30 * lr."""
    shape = (4099,)
    p8 = torch.nn.Parameter(torch.zeros(shape))
    p32 = torch.nn.Parameter(torch.zeros(shape))
    o8 = so.SubspaceAdamW([p8], state_bits=8, weight_decay=0.0)
    o32 = torch.optim.AdamW([p32], weight_decay=0.0)
    for g in gradient_stream((4099, 1), 30, seed=30):
        p8.grad, p32.grad = g.reshape(shape).clone(), g.reshape(shape).clone()
        o8.step()
        o32.step()
    assert o8.state[p8]["exp_avg"].shape == shape
    assert o8.state[p8]["exp_avg_absmax"].numel() == -(-4099 // 256)
    assert (p8 - p32).abs().max() < 0.1 * 30 * 1e-3
    assert (p32.abs().max()) > 10 * 1e-3  # and the weights did move


def test_8bit_states_survive_weights_only_checkpoint_and_resume_bit_exact():
    def build():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(96, 128))
        return w, so.QGaLoreAdamW8bit([{"params": [w], "rank": 64, "update_proj_gap": 3}])

    grads = gradient_stream((96, 128), 10, seed=31)
    w, opt = build()
    for g in grads:
        w.grad = g.clone()
        opt.step()
    w2, opt2 = build()
    for g in grads[:5]:
        w2.grad = g.clone()
        opt2.step()
    buf = io.BytesIO()
    torch.save({"w": w2.detach(), "optim": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    w3, opt3 = build()
    with torch.no_grad():
        w3.copy_(ckpt["w"])
    opt3.load_state_dict(ckpt["optim"])
    assert opt3.state[w3]["exp_avg"].dtype == torch.uint8
    assert opt3.state[w3]["proj_codes"].dtype == torch.uint8
    for g in grads[5:]:
        w3.grad = g.clone()
        opt3.step()
    assert torch.equal(w, w3)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_8bit_encoding_is_the_nearest_map_entry_and_decodes_with_bitsandbytes(signed):
    """The library's encoder (quant.blockwise) against a brute-force nearest entry, and its
    states against bitsandbytes' own functions: bitsandbytes decodes them to the same
    values, and its native CPU encoder (an approximate search) lands on the same code but
    for a few values near a midpoint, one code away."""
    import bitsandbytes.functional as F

    from subspace_optim.quant.blockwise import (
        dequantize_blockwise_8bit,
        dynamic_map,
        quantize_blockwise_8bit,
    )

    torch.manual_seed(0)
    x = torch.randn(257 * 33) * torch.logspace(-6, 0, 257 * 33)  # all magnitudes, odd size
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise_8bit(x, signed)
    table = dynamic_map(signed, x.device)
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % 256)).view(-1, 256)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)[: x.numel()]
    distance = (scaled.unsqueeze(1) - table.unsqueeze(0)).abs()
    chosen = distance.gather(1, codes.long().unsqueeze(1)).squeeze(1)
    assert torch.equal(chosen, distance.min(dim=1).values)  # ties may pick either entry

    theirs = F.dequantize_blockwise(codes, absmax=absmax, code=table, blocksize=256)
    assert torch.equal(theirs, dequantize_blockwise_8bit(codes, absmax, signed))

    native, state = F.quantize_blockwise(x, code=table, blocksize=256)
    assert torch.equal(state.absmax, absmax)
    differ = native != codes
    assert differ.float().mean() <= 0.01
    assert ((native.int() - codes.int()).abs() <= 1).all()


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    from subspace_optim.quant import blockwise

    blockwise.dynamic_map.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    w = torch.nn.Parameter(torch.randn(128, 128))
    opt = so.SubspaceAdamW([w], state_bits=8)
    w.grad = torch.randn(128, 128)
    with pytest.raises(ImportError, match=r'pip install "\.\[bnb\]"'):
        opt.step()
    blockwise.dynamic_map.cache_clear()


def test_bad_state_bits_is_named():
    with pytest.raises(ValueError, match=r"Invalid state_bits: 4"):
        so.SubspaceAdamW([torch.nn.Parameter(torch.randn(2, 2))], state_bits=4)


@pytest.mark.gpu
def test_8bit_states_on_cuda_follow_the_cpu_run():
    """Same 8-bit run on CUDA and CPU: both quantise with the same maps and block size, so
    the weights agree to within the 8-bit state error (bounded as in the odd-size test)."""
    grads = gradient_stream((128, 96), 20, seed=40)
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(128, 96, device=device))
        opt = so.GaLoreAdamW8bit([{"params": [w], "rank": 64}])
        for g in grads:
            w.grad = g.to(device)
            opt.step()
        assert opt.state[w]["exp_avg"].dtype == torch.uint8
        results.append(w.detach().cpu())
    assert (results[0] - results[1]).abs().max() < 0.1 * 20 * 1e-3


def test_the_8bit_classes_take_bitsandbytes_keywords():
    """bitsandbytes' AdamW8bit keywords were a bare TypeError: taken where they mean
    something (optim_bits, min_8bit_size, and the defaults of the others), a ValueError
    naming the keyword otherwise."""
    pytest.importorskip("bitsandbytes")
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = so.GaLoreAdamW8bit([{"params": [w], "rank": 8}], optim_bits=8, min_8bit_size=256,
                             percentile_clipping=100, block_wise=True, is_paged=False,
                             amsgrad=False)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.uint8  # 512 elements >= 256: 8-bit
    default = so.GaLoreAdamW8bit([{"params": [w], "rank": 8}])
    default.step()
    assert default.state[w]["exp_avg"].dtype == torch.float32  # under 4096: float32
    assert so.QGaLoreAdamW8bit([{"params": [w], "rank": 8, "quant_group_size": 64}],
                               optim_bits=32).param_groups[0]["state_bits"] == 32
    for keyword, value in (("percentile_clipping", 5), ("is_paged", True),
                           ("block_wise", False), ("amsgrad", True), ("optim_bits", 16)):
        with pytest.raises(ValueError, match=rf"{keyword}={value!r}"):
            so.GaLoreAdamW8bit([{"params": [w], "rank": 8}], **{keyword: value})
