"""Each Triton kernel against its op's PyTorch implementation (the same signature), on small
and odd shapes (sizes 1, 33, 257) in fp32, fp16 and bf16.

The rule (Liger-Kernel's and flash-attention's): in fp32 the kernel equals the PyTorch
implementation within torch.testing's fp32 tolerances times 5 (a chain of several ops);
in reduced precision, the kernel's error against the fp32 PyTorch result (on the same
reduced-precision inputs) is at most twice the reduced-precision PyTorch result's error, plus
1e-6. Without a GPU they run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from subspace_optim.kernels import registry  # noqa: E402, F401
from subspace_optim.kernels._common import hash_bits, key32  # noqa: E402

from subspace_optim import counter_rng, ops  # noqa: E402
from subspace_optim.quant import quantize_groupwise  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (m, n, rank): a row, a column, odd sizes, rank 1 and rank = min(m, n).
SHAPES = [(1, 257, 1), (33, 257, 33), (257, 33, 33), (257, 257, 1), (33, 33, 33)]
FP32 = {"rtol": 5 * 1.3e-6, "atol": 5 * 1e-5}


def _torch(name):
    return ops._TORCH[name]


def _triton(name):
    return ops._TRITON[name]


def _floats(args, dtype, data=None):
    """The arguments with the data tensors in ``dtype``: those at the indices ``data``, by
    default every floating matrix (quantisation scales and Grass's row scales are vectors
    and keep their float32)."""
    def is_data(i, a):
        if not (torch.is_tensor(a) and a.is_floating_point()):
            return False
        return i in data if data is not None else a.dim() > 1
    return [a.to(dtype) if is_data(i, a) else (a.clone() if torch.is_tensor(a) else a)
            for i, a in enumerate(args)]


def _run(impl, args, mutated):
    """Outputs of ``impl`` on copies of ``args``: its result, then the mutated arguments."""
    args = [a.clone() if torch.is_tensor(a) else a for a in args]
    out = impl(*args)
    return ([out] if out is not None else []) + [args[i] for i in mutated]


def check(name, args, mutated, dtype, data=None):
    """The rule of the module docstring, for op ``name`` on ``args`` (fp32 values). The
    fp32 reference starts from the reduced-precision inputs, so that only the arithmetic's
    rounding is compared, not the inputs'."""
    low = _floats(args, dtype, data)
    reference = _run(_torch(name), _floats(low, torch.float32, data), mutated)
    kernel = _run(_triton(name), low, mutated)
    baseline = _run(_torch(name), low, mutated)
    for ref, k, b in zip(reference, kernel, baseline, strict=True):
        if not ref.is_floating_point():
            continue
        if dtype == torch.float32:
            torch.testing.assert_close(k, b, **FP32)
            continue
        kernel_error = (k.float() - ref.float()).abs().max().item()
        torch_error = (b.float() - ref.float()).abs().max().item()
        assert kernel_error <= 2 * torch_error + 1e-6, (kernel_error, torch_error)


def _seeded(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


# --------------------------------------------------------------------------- projected AdamW
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("galore", [False, True], ids=["torch", "galore"])
def test_projected_adamw_update(dtype, shape, right, galore):
    torch.manual_seed(0)
    m, n, r = shape
    low = (m, r) if right else (r, n)
    basis = _seeded(*((r, n) if right else (m, r))) / math.sqrt(max(m, n))
    moments = (_seeded(*low, scale=0.1), _seeded(*low).abs() * 0.01)
    args = [_seeded(m, n), _seeded(*low), basis, *moments, 3, 1e-2, 0.9, 0.999, 1e-6, 0.1,
            0.25, right, galore, True, False]
    check("projected_adamw_update", args, (0, 3, 4), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 33, 257 * 33])
def test_full_rank_adamw_update(dtype, numel):
    torch.manual_seed(0)
    shape = (numel,) if numel < 100 else (257, 33)
    args = [_seeded(*shape), _seeded(*shape), None, _seeded(*shape, scale=0.1),
            _seeded(*shape).abs() * 0.01, 5, 1e-2, 0.9, 0.99, 1e-8, 0.01, 1.0, True, False,
            True, True]
    check("projected_adamw_update", args, (0, 3, 4), dtype, data=(0, 1, 3, 4))


# --------------------------------------------------------------------------- INT4 basis
def _packed_basis(rows, cols, bits):
    codes, scales, zeros = quantize_groupwise(_seeded(rows, cols), bits, 64)
    return codes, scales, zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("bits", [4, 8])
def test_int4_project(dtype, shape, right, bits):
    torch.manual_seed(0)
    m, n, r = shape
    packed = _packed_basis(*((r, n) if right else (m, r)), bits)
    check("int4_project", [_seeded(m, n), *packed, r, right, bits, 64], (), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_int4_project_back(dtype, shape, right):
    torch.manual_seed(0)
    m, n, r = shape
    packed = _packed_basis(*((r, n) if right else (m, r)), 4)
    low = _seeded(*((m, r) if right else (r, n)))
    args = [_seeded(m, n), low, *packed, right, 4, 64, torch.float32, -0.5, 0.99]
    check("int4_project_back_", args, (0,), dtype)


# --------------------------------------------------------------------------- Flora
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_flora_project_and_back(dtype, shape, right):
    torch.manual_seed(0)
    m, n, r = shape
    seed = torch.tensor(2**40 + 17)
    check("flora_project", [_seeded(m, n), seed, r, right], (), dtype)
    low = _seeded(*((m, r) if right else (r, n)))
    check("flora_project_back_", [_seeded(m, n), low, seed, right, 0.3, 1.0], (0,), dtype)


@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 257), (257, 33)])
def test_flora_matrix_is_the_same_matrix(rows, cols):
    """The same hash in both: equal up to float32 log/cos rounding."""
    seed = torch.tensor(123456789)
    like = torch.empty(0, device=DEVICE)
    ours = _triton("flora_matrix")(seed, like, rows, cols, 7)
    theirs = _torch("flora_matrix")(seed, like, rows, cols, 7)
    torch.testing.assert_close(ours, theirs, **FP32)


# --------------------------------------------------------------------------- Grass
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("beta", [1.0, 0.9])
def test_grass_gather_and_scatter(dtype, shape, right, beta):
    torch.manual_seed(0)
    m, n, r = shape
    d = n if right else m
    idx = torch.randperm(d, device=DEVICE)[:r].sort().values.int()
    scales = torch.rand(r, device=DEVICE) + 0.5
    check("grass_gather", [_seeded(m, n), idx, scales, right], (), dtype)
    low = _seeded(*((m, r) if right else (r, n)))
    check("grass_scatter_update_", [_seeded(m, n), low, idx, scales, right, -0.7, beta], (0,),
          dtype)


# --------------------------------------------------------------------------- INT8 weights
@pytest.mark.parametrize("numel,group", [(1, 256), (33, 256), (257 * 33, 256), (1000, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_rounding_store_draws_the_same_rounding(numel, group, dtype):
    """Same hash, same grid: the codes agree except where float rounding of w / s lands on
    the other side of the draw (at most 0.1% of elements, each by one step)."""
    torch.manual_seed(0)
    weight = _seeded(numel).to(dtype)
    groups = -(-numel // group)

    def run(impl):
        codes = torch.zeros(numel, dtype=torch.uint8, device=DEVICE)
        scales = torch.zeros(groups, device=DEVICE)
        zeros = torch.zeros(groups, dtype=torch.uint8, device=DEVICE)
        impl(codes, scales, zeros, weight, 11, 7, group)
        return codes, scales, zeros

    ours, theirs = run(_triton("int8_sr_store_")), run(_torch("int8_sr_store_"))
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=0)
    assert torch.equal(ours[2], theirs[2])
    diff = (ours[0].int() - theirs[0].int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, numel // 1000)


def test_stochastic_rounding_kernel_is_unbiased():
    """E[stored] = w: mean of 2,000 draws (offsets) within 4 standard errors."""
    weight = torch.tensor([-0.731, -0.5, -0.1234, 0.0, 0.3, 0.5678, 1.234], device=DEVICE)
    total = torch.zeros_like(weight, dtype=torch.float64)
    draws = 2000
    codes = torch.zeros(7, dtype=torch.uint8, device=DEVICE)
    scales = torch.zeros(1, device=DEVICE)
    zeros = torch.zeros(1, dtype=torch.uint8, device=DEVICE)
    for offset in range(draws):
        _triton("int8_sr_store_")(codes, scales, zeros, weight, 3, offset, 256)
        total += ((codes.float() - zeros.float()) * scales).double()
    s = float(scales)
    frac = torch.frac(weight / s + 1000).double()
    se = s * (frac * (1 - frac) / draws).sqrt()
    assert ((total / draws - weight.double()).abs() <= 4 * se + 1e-7).all()


# --------------------------------------------------------------------------- 8-bit states
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 33, 257 * 33, 4096])
@pytest.mark.parametrize("galore", [False, True], ids=["torch", "galore"])
def test_blockwise8_adamw_update(numel, galore, dtype):
    """The gradient in each dtype; both compute the moments in fp32 from it, so the fp32
    rule applies to the direction."""
    pytest.importorskip("bitsandbytes")
    from subspace_optim.quant.blockwise import (
        dequantize_blockwise_8bit,
        quantize_blockwise_8bit,
    )

    torch.manual_seed(0)
    shape = (numel // 33, 33) if numel % 33 == 0 else (numel,)
    grad = _seeded(*shape).to(dtype)
    m0, v0 = _seeded(*shape, scale=0.1), _seeded(*shape).abs() * 0.01

    def run(impl):
        mc, ma = quantize_blockwise_8bit(m0, signed=True)
        vc, va = quantize_blockwise_8bit(v0, signed=False)
        direction = impl(grad, mc, ma, vc, va, 4, 0.9, 0.999, 1e-8, galore, True, False)
        return (direction, dequantize_blockwise_8bit(mc, ma, True),
                dequantize_blockwise_8bit(vc, va, False), ma, va)

    ours, theirs = run(_triton("blockwise8_adamw_update")), run(_torch("blockwise8_adamw_update"))
    torch.testing.assert_close(ours[0], theirs[0], **FP32)  # same arithmetic, fp32
    for mine, ref, absmax in ((ours[1], theirs[1], theirs[3]), (ours[2], theirs[2], theirs[4])):
        # Both take the nearest code of the same map. A moment that rounding puts on the
        # other side of a midpoint lands one code away (the map's widest gap is 1/64 of the
        # absmax); that is rare, not systematic.
        step = absmax.max() / 64
        assert (mine - ref).abs().max() <= step
        assert ((mine - ref).abs() > 1e-6 * absmax.max()).float().mean() <= 1e-3
    torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=0)


@triton.jit
def _bits_kernel(counter_ptr, out_ptr, n, key, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    counter = tl.load(counter_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + offs, hash_bits(key.to(tl.uint32), counter).to(tl.int64), mask=offs < n)


def test_the_kernels_hash_is_the_librarys():
    """hash_bits in Triton's uint32 equals counter_rng.bits in int64 tensors, bit for bit,
    also for counters past 2**32 (their high word enters the hash)."""
    seed = torch.tensor(2**45 + 98765)
    counters = torch.cat((torch.arange(0, 500, 7), torch.arange(2**32 - 3, 2**32 + 60)))
    counters = counters.to(DEVICE)
    out = torch.empty_like(counters)
    _bits_kernel[(1,)](counters, out, counters.numel(), key32(seed), BLOCK=256)
    assert torch.equal(out, counter_rng.bits(counter_rng.key(seed).to(DEVICE), counters))
