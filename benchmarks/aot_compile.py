"""Every Triton kernel compiled ahead of time for real GPUs, without one.

Triton's interpreter (what the CPU tests run) forgives what hardware does not: it ignores
TF32, never autotunes, never specialises an int argument equal to 1, and does not care
about registers, shared memory or 32-bit offsets. This script drives the op wrappers of
``subspace_optim.kernels`` over every dtype, flag, side, bit width and shape class
(multiples of 16, odd sizes, size 1) with CPU tensors, captures each kernel launch instead
of running it, and compiles every distinct specialisation with Triton's own compiler for
``GPUTarget("cuda", 80 | 89 | 90, 32)`` (A100, consumer Ada, H100). No driver is needed:
the compiler and the ``ptxas`` in Triton's wheel run on the CPU.

For each specialisation, target and (autotuned kernels) configuration it records: whether
it compiled, the shared memory the compiled kernel needs against the target's limit,
registers and spilled bytes (``ptxas -v`` on the PTX, with the flags Triton uses), whether
fp32 products use TF32 instructions, whether every address offset is 64-bit (read from the
Triton IR), and, for the GEMM, the shared memory the autotuner's pruning estimated and
whether the pruning keeps the configuration on that target.

    python benchmarks/aot_compile.py             # the full matrix -> results/aot_compile.csv
    python benchmarks/aot_compile.py --smoke --out /tmp/aot.csv   # a representative subset

The full matrix takes about 30 minutes on 2 CPU cores (compiled kernels are cached in
~/.triton/cache, so a rerun is faster); ``tests/test_aot_compile.py`` runs the subset and
checks the committed full results.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from _results import results_path, write_csv
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

TARGETS = {"sm_80": (8, 0), "sm_89": (8, 9), "sm_90": (9, 0)}
OUT = Path(__file__).parent / "results" / "aot_compile.csv"
# Kernels that are elementwise (or row-wise): none may spill registers.
ELEMENTWISE = {"_adamw_kernel", "_blockwise8_kernel", "_flora_matrix_kernel", "_sr_kernel",
               "_gather_kernel", "_scatter_rows_kernel", "_scatter_all_kernel"}


class _CaptureDriver:
    """Enough of a CUDA driver for Triton to specialise and compile for ``target``."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclass
class Launch:
    """One captured launch: the kernel (or its autotuner), the op and case that made it."""

    op: str
    case: str
    fn: object
    args: tuple
    kwargs: dict
    extra: dict = field(default_factory=dict)


_captured: list[tuple] = []


def _capture_jit(self, *args, grid, warmup, **kwargs):
    _captured.append((self, args, kwargs))


def _capture_autotuned(self, *args, **kwargs):
    _captured.append((self, args, {k: v for k, v in kwargs.items()
                                   if k not in ("grid", "warmup")}))


def capture(op: str, case: str, call) -> list[Launch]:
    """The kernel launches of ``call()``, which runs an op wrapper on CPU tensors."""
    _captured.clear()
    originals = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = _capture_jit, _capture_autotuned
    try:
        call()
    finally:
        JITFunction.run, Autotuner.run = originals
    return [Launch(op, case, fn, args, kwargs) for fn, args, kwargs in _captured]


# --------------------------------------------------------------------------- the matrix
SHAPES = {"mult16": (256, 192, 32), "odd": (257, 129, 33), "size1": (1, 65, 1)}
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _matrix(smoke: bool):
    """``(op, case, call, tf32[, extra])`` for every combination; ``smoke``: a subset that
    still launches every kernel, both sides, both TF32 settings and a key of 1."""
    from subspace_optim.kernels import registry  # noqa: F401

    from subspace_optim import ops
    from subspace_optim.quant import quantize_groupwise
    from subspace_optim.quant.blockwise import quantize_blockwise_8bit

    def k(name):
        return ops._TRITON[name]

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    shapes = {"odd": SHAPES["odd"]} if smoke else SHAPES
    dtypes = ("fp32", "bf16") if smoke else tuple(FLOATS)
    both = (False, True)
    sides = (True, False)
    # (weight dtype, moment dtype): moments in the gradient's dtype or, with
    # state_bits=32, float32 beside a reduced-precision weight.
    precisions = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"),
                  ("fp16", "fp32")]
    if smoke:
        precisions = [("fp32", "fp32"), ("bf16", "fp32")]
    for (sname, (m, n, rank)), (wd, md), galore, maximize, tf32, basis_side in \
            itertools.product(shapes.items(), precisions, both, both, both,
                              ("full", "right", "left")):
        if smoke and (maximize or galore != tf32 or (wd == "bf16" and basis_side == "left")):
            continue
        if tf32 and (basis_side == "full" or wd != "fp32" and md != "fp32"):
            continue  # no fp32 product: the setting changes nothing
        wt, mt = FLOATS[wd], FLOATS[md]
        low = (m, n) if basis_side == "full" else (m, rank) if basis_side == "right" \
            else (rank, n)
        basis = None if basis_side == "full" else r(
            *((rank, n) if basis_side == "right" else (m, rank)), dtype=wt)
        case = (f"{sname} weight={wd} moments={md} {basis_side} galore={galore} "
                f"maximize={maximize} tf32={tf32}")

        def call(low=low, basis=basis, right=basis_side == "right", galore=galore,
                 maximize=maximize, wt=wt, mt=mt, m=m, n=n):
            k("projected_adamw_update")(
                r(m, n, dtype=wt), r(*low, dtype=mt), basis, r(*low, dtype=mt),
                r(*low, dtype=mt).abs(), 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.25, right,
                galore, True, maximize)
        yield "projected_adamw_update", case, call, tf32

    for (sname, (m, n, _)), gd, galore, maximize in itertools.product(
            shapes.items(), dtypes, both, both):
        if smoke and (maximize or galore != (gd == "bf16")):
            continue

        def call(m=m, n=n, gd=gd, galore=galore, maximize=maximize):
            mc, ma = quantize_blockwise_8bit(r(m, n), True)
            vc, va = quantize_blockwise_8bit(r(m, n).abs(), False)
            k("blockwise8_adamw_update")(r(m, n, dtype=FLOATS[gd]), mc, ma, vc, va, 3, 0.9,
                                         0.999, 1e-8, galore, True, maximize)
        yield ("blockwise8_adamw_update", f"{sname} grad={gd} galore={galore} "
               f"maximize={maximize}", call, False)

    for (sname, (m, n, rank)), gd, right, bits, tf32 in itertools.product(
            shapes.items(), dtypes, sides, (4, 8), both):
        if tf32 and gd != "fp32":
            continue
        if smoke and (bits == 8 and not right or gd == "bf16" and not right):
            continue
        stored = (rank, n) if right else (m, rank)
        group = 64 if stored[0] * stored[1] % 64 == 0 else 1

        def project(m=m, n=n, rank=rank, gd=gd, right=right, bits=bits, stored=stored,
                    group=group):
            packed = quantize_groupwise(r(*stored), bits, group)
            k("int4_project")(r(m, n, dtype=FLOATS[gd]), *packed, rank, right, bits, group)

        def back(m=m, n=n, rank=rank, gd=gd, right=right, bits=bits, stored=stored,
                 group=group):
            packed = quantize_groupwise(r(*stored), bits, group)
            low = r(*((m, rank) if right else (rank, n)))
            k("int4_project_back_")(r(m, n, dtype=FLOATS[gd]), low, *packed, right, bits,
                                    group, torch.float32, -0.5, 0.99)
        case = f"{sname} {gd} {'right' if right else 'left'} bits={bits} tf32={tf32}"
        yield "int4_project", case, project, tf32
        yield "int4_project_back_", case, back, tf32

    seed = torch.tensor(2**40 + 17)
    for (sname, (m, n, rank)), gd, right, tf32, key_one in itertools.product(
            shapes.items(), dtypes, sides, both, both):
        if tf32 and gd != "fp32":
            continue
        if smoke and (key_one and (gd != "fp32" or tf32) or gd == "bf16" and not right):
            continue
        def project(m=m, n=n, rank=rank, gd=gd, right=right):
            k("flora_project")(r(m, n, dtype=FLOATS[gd]), seed, rank, right)

        def back(m=m, n=n, rank=rank, gd=gd, right=right):
            low = r(*((m, rank) if right else (rank, n)), dtype=FLOATS[gd])
            k("flora_project_back_")(r(m, n, dtype=FLOATS[gd]), low, seed, right, 0.3, 0.9)

        def matrix(m=m, n=n, rank=rank, gd=gd):
            k("flora_matrix")(seed, torch.empty(0, dtype=FLOATS[gd]), m, n, rank)
        extra = {"key_one": key_one}
        case = f"{sname} {gd} {'right' if right else 'left'} tf32={tf32} key=1:{key_one}"
        yield "flora_project", case, project, tf32, extra
        yield "flora_project_back_", case, back, tf32, extra
        if right and not tf32:
            yield "flora_matrix", f"{sname} {gd} key=1:{key_one}", matrix, False, extra

    for (sname, (m, n, rank)), gd, right, beta, idx_dtype in itertools.product(
            shapes.items(), dtypes, sides, (1.0, 0.9), (torch.int32, torch.int64)):
        if smoke and (idx_dtype == torch.int64 or gd == "bf16" and beta == 0.9):
            continue
        d = n if right else m
        idx = torch.randperm(d)[:rank].sort().values.to(idx_dtype)
        scales = torch.rand(rank) + 0.5

        def gather(m=m, n=n, gd=gd, right=right, idx=idx, scales=scales):
            k("grass_gather")(r(m, n, dtype=FLOATS[gd]), idx, scales, right)

        def scatter(m=m, n=n, rank=rank, gd=gd, right=right, idx=idx, scales=scales,
                    beta=beta):
            low = r(*((m, rank) if right else (rank, n)), dtype=FLOATS[gd])
            k("grass_scatter_update_")(r(m, n, dtype=FLOATS[gd]), low, idx, scales, right,
                                       -0.7, beta)
        case = f"{sname} {gd} {'right' if right else 'left'} beta={beta} {idx_dtype}"
        if beta == 1.0:
            yield "grass_gather", case, gather, False
        yield "grass_scatter_update_", case, scatter, False

    for (sname, (m, n, _)), wd, group, key_one in itertools.product(
            shapes.items(), dtypes, (256, 64), both):
        if smoke and (group == 64 and not key_one or wd == "bf16" and key_one):
            continue

        def store(m=m, n=n, wd=wd, group=group):
            numel = m * n
            groups = -(-numel // group)
            k("int8_sr_store_")(torch.zeros(numel, dtype=torch.uint8), torch.zeros(groups),
                                torch.zeros(groups, dtype=torch.uint8),
                                r(numel, dtype=FLOATS[wd]), 11, 7, group)
        yield ("int8_sr_store_", f"{sname} {wd} group={group} key=1:{key_one}", store, False,
               {"key_one": key_one})


def _key_one(enabled: bool):
    """Make every kernel key 1 (a value Triton would specialise) while capturing."""
    from subspace_optim.kernels import _common, flora, int8_store

    modules = (_common, flora, int8_store)
    saved = [m.key32 for m in modules]
    if enabled:
        for m in modules:
            m.key32 = lambda seed, stream=0: 1
    return lambda: [setattr(m, "key32", f) for m, f in zip(modules, saved, strict=True)]


def launches(smoke: bool, only: set[str] | None = None) -> list[Launch]:
    """Every distinct specialisation the matrix launches (one entry per kernel and
    specialisation; an autotuned kernel's configurations are expanded at compile time)."""
    out, seen = [], set()
    driver.set_active(_CaptureDriver(GPUTarget("cuda", 80, 32)))
    try:
        for entry in _matrix(smoke):
            op, case, call, tf32, *rest = entry
            if only and op not in only:
                continue
            extra = rest[0] if rest else {}
            restore = _key_one(extra.get("key_one", False))
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                captured = capture(op, case, call)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
                restore()
            for launch in captured:
                jit = _jit(launch.fn)
                tuned = (launch.fn.configs[0].all_kwargs()
                         if isinstance(launch.fn, Autotuner) else {})
                _, specialization, _ = jit.create_binder()[4](
                    *launch.args, **_options({**launch.kwargs, **tuned}))
                key = (jit.__name__, str(specialization),
                       str(sorted((k, str(v)) for k, v in launch.kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                launch.extra = extra
                out.append(launch)
    finally:
        driver.set_active(None)
    return out


def _jit(fn) -> JITFunction:
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _options(kwargs: dict) -> dict:
    return {**kwargs, "debug": False,
            "instrumentation_mode": knobs.compilation.instrumentation_mode,
            "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}


# --------------------------------------------------------------------------- compiling
_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ADDPTR = re.compile(r"tt\.addptr .*:\s*(\S+),\s*(tensor<[^>]*>|i\d+)(\s+loc\(.*\))?\s*$")


def ptxas_report(ptx: str, capability: tuple[int, int]) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) of the PTX, by ``ptxas -v`` with the
    flags Triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    cc = capability[0] * 10 + capability[1]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(cc)}", str(src), "-o", str(src) + ".o"],
            capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout
    registers = max(int(x) for x in _PTXAS.findall(log))
    spills = [tuple(map(int, s)) for s in _SPILLS.findall(log)]
    return (registers, max(s for s, _ in spills), max(lo for _, lo in spills))


def offsets_are_64bit(ttir: str) -> bool:
    """Whether every ``tt.addptr`` of the Triton IR adds a 64-bit offset."""
    types = [m.group(2) for line in ttir.splitlines() if (m := _ADDPTR.search(line.strip()))]
    return bool(types) and all(t.endswith("xi64>") or t == "i64" for t in types)


def _compile_one(job: tuple[int, str, int | None]) -> dict:
    index, target_name, config_index = job
    launch = _JOBS_LAUNCHES[index]
    cc = TARGETS[target_name]
    from subspace_optim.kernels import _common, gemm

    _common.target_capability = cc
    target = GPUTarget("cuda", cc[0] * 10 + cc[1], 32)
    driver.set_active(_CaptureDriver(target))
    jit = _jit(launch.fn)
    kwargs = dict(launch.kwargs)
    row = {"kernel": jit.__name__, "op": launch.op, "case": launch.case, "target": target_name,
           "config": "", "kept": True, "estimated_shared": "", "shared": "",
           "shared_limit": _common.SHARED_MEMORY[cc], "registers": "", "spill_stores": "",
           "spill_loads": "", "tf32": "", "offsets_64bit": "", "status": "ok", "error": ""}
    if config_index is not None:
        tuner = launch.fn
        config = tuner.configs[config_index]
        row["kept"] = any(config is c for c in _kept(launch, cc))
        tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))
        row["config"] = (f"BM{config.kwargs['BM']} BN{config.kwargs['BN']} "
                         f"BK{config.kwargs['BK']} w{config.num_warps} s{config.num_stages}")
        dot_bytes = gemm._BYTES[kwargs["DOT"]]
        named = tuner.nargs

        def size(name, kind):
            return named[name].element_size() if kind == gemm.DENSE else dot_bytes
        row["estimated_shared"] = gemm.shared_memory_bytes(
            config, kwargs["A_KIND"], size("a_ptr", kwargs["A_KIND"]), kwargs["B_KIND"],
            size("b_ptr", kwargs["B_KIND"]), dot_bytes, cc)
        tuner.nargs = None
        kwargs.update(config.all_kwargs())
    try:
        _, _, tgt, backend, binder = jit.create_binder()
        options = _options(kwargs)
        bound, specialization, opts = binder(*launch.args, **options)
        opts, signature, constexprs, attrs = jit._pack_args(backend, options, bound,
                                                            specialization, opts)
        kernel = triton.compile(jit.ASTSource(jit, signature, constexprs, attrs), target=tgt,
                                options=opts.__dict__)
        row["shared"] = kernel.metadata.shared
        row["registers"], row["spill_stores"], row["spill_loads"] = ptxas_report(
            kernel.asm["ptx"], cc)
        row["tf32"] = bool(re.search(r"\b(w?mma)\S*\.tf32", kernel.asm["ptx"]))
        row["offsets_64bit"] = offsets_are_64bit(kernel.asm["ttir"])
    except Exception as error:  # recorded, not raised: the CSV lists every failure
        row["status"] = "failed"
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    return row


_JOBS_LAUNCHES: list[Launch] = []


def jobs(found: list[Launch], targets: list[str],
         smoke: bool) -> list[tuple[int, str, int | None]]:
    """(launch, target, configuration) to compile. A smoke run compiles every configuration
    of the first two autotuned specialisations on every target, and of each other one the
    last configuration the autotuner keeps, on one target (in turn)."""
    out, tuned = [], 0
    for index, launch in enumerate(found):
        if not isinstance(launch.fn, Autotuner):
            out += [(index, t, None) for t in targets]
            continue
        tuned += 1
        if not smoke or tuned <= 2:
            out += [(index, t, c) for t in targets for c in range(len(launch.fn.configs))]
            continue
        target = targets[tuned % len(targets)]
        kept = _kept(launch, TARGETS[target])
        out.append((index, target, launch.fn.configs.index(kept[-1])))
    return out


def _kept(launch: Launch, cc: tuple[int, int]) -> list:
    """The configurations the autotuner's pruning keeps for ``launch`` on ``cc``."""
    from subspace_optim.kernels import _common

    saved, _common.target_capability = _common.target_capability, cc
    tuner = launch.fn
    tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))
    try:
        return tuner.prune_configs(dict(launch.kwargs))
    finally:
        tuner.nargs = None
        _common.target_capability = saved


def run(smoke: bool, targets: list[str], workers: int, progress: bool = True,
        only: set[str] | None = None) -> list[dict]:
    global _JOBS_LAUNCHES
    found = launches(smoke, only)
    _JOBS_LAUNCHES = found
    todo = jobs(found, targets, smoke)
    rows = []
    start = time.perf_counter()
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for done, row in enumerate(pool.map(_compile_one, todo, chunksize=1), start=1):
            rows.append(row)
            if progress and (done % 10 == 0 or done == len(todo)):
                elapsed = time.perf_counter() - start
                left = elapsed / done * (len(todo) - done)
                print(f"\r{done}/{len(todo)} compiled, {elapsed:.0f} s, about {left:.0f} s left",
                      end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return rows


def summary(rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    over = [r for r in rows if r["status"] == "ok" and r["kept"]
            and int(r["shared"]) > int(r["shared_limit"])]
    spills = [r for r in rows if r["status"] == "ok" and r["kernel"] in ELEMENTWISE
              and int(r["spill_stores"]) > 0]
    kernels = {(r["kernel"], r["case"], r["config"]) for r in rows}
    return (f"{len(rows)} compilations ({len(kernels)} specialisations x configurations, "
            f"targets {sorted({r['target'] for r in rows})}): {len(failed)} failed, "
            f"{len(over)} kept configurations over their target's shared memory, "
            f"{len(spills)} elementwise kernels spilling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the representative subset")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated, of " + ", ".join(TARGETS))
    parser.add_argument("--ops", default="",
                        help="comma-separated op names to compile (default: every op)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None,
                        help=f"CSV to write (default: {OUT} for the full matrix; a smoke "
                             "run writes to the temporary directory)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: kernels are captured as compiled code, not "
                     "interpreted")
    # The current default of fp fusion, set so that Triton does not warn at every compile.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; known: {', '.join(TARGETS)}")
    rows = run(args.smoke, targets, args.workers, only=set(filter(None, args.ops.split(","))))
    out = results_path(args.out, str(OUT), args.smoke)
    provenance = write_csv(out, rows)
    print(f"{summary(rows)}\nwrote {out} ({provenance})")


if __name__ == "__main__":
    main()
