"""Fingerprints of every optimizer's results, recorded in float64: the reference path must
reproduce them on any x86-64 CPU, within a bound that follows from float64's rounding.

``python tests/golden.py`` rewrites ``tests/data/golden.json``. It is run only when a change
of results is intended (and said so in the README). History: recorded bit for bit in fp32
from the per-tensor code before the step engine was rebuilt; Flora's projection matrix and
the stochastic rounding of INT8 weights moved to counter-based generators, whose scenarios
were recorded again; recorded again in float64 (issue 19), because fp32 bits depend on the
CPU: MKL and ATen pick other code paths (AVX-512, AVX2, thread counts), whose sums round in
another order.

Each scenario trains a wide, a tall and a 3-D matrix (projected) and a bias (full rank) for
40 steps of a fixed gradient stream with refreshes every 5 steps; the 3-D matrix gets no
gradient at step 7. Inputs are drawn the same on every CPU (``portable_randn``).
Everything is float64: parameters, gradients, and the moments (but for
the scenarios that store them in bf16 or 8 bits). The fingerprint of each final parameter
and each of the rule's moments (``exp_avg*``; a projector's bookkeeping may change
representation without changing any result) is its norm and its inner products with four
fixed Gaussian vectors: a change of any element moves them.

The bound. Another CPU computes the same operations in another order, or with another
instruction set (fused multiply-adds, vectorised logarithms): each result moves by a few
units of roundoff, and the dynamics amplify that as they amplify any rounding (Adam's
normalisation divides by small second moments, an SVD rotates a basis by the rounding over
a spectral gap). The fp32 comparison of two implementations that round differently measured
at most 6.7e-6 of the weights' scale after 50 steps (tests/test_engine.py on an Intel Xeon),
that is 2**-24 amplified about 110x. A scenario computed in float64 throughout: the same
amplification of 2**-53 is 2e-14, and ``TOLERANCE`` = 1e-10 of each fingerprint's scale
(the norm, times the probe's norm for an inner product) leaves four orders of magnitude for
another machine, still 10**2 below a change of every element of a tensor by one fp32
rounding (6e-8 relative), the smallest change of arithmetic worth recording. A scenario
that computes part of its step in float32 by design (moments stored in float32, bf16 or 8
bits; Adafactor's float32 statistics; Flora's and APOLLO's Gaussian basis, drawn in
float32 by the counter-based Box-Muller shared with the kernel or by torch.randn, whose
vectorised log and cos round by the CPU's code path and thread split; Q-GaLore's float32
group scales) moves by float32 rounding instead:
``TOLERANCE_FP32`` = 1e-5 covers 2**-24 amplified 110x (6.6e-6), and still sees every
element of a tensor moved by a few hundred fp32 roundings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from optim_db import OPTIMIZERS, PROJECTORS  # noqa: E402
from references import gradient_stream, portable_randn  # noqa: E402

PATH = Path(__file__).parent / "data" / "golden.json"
STEPS = 40
TOLERANCE = 1e-10
TOLERANCE_FP32 = 1e-5
PROBES = 4
SHAPES = {"wide": (24, 40), "tall": (40, 24), "cube": (6, 4, 5), "bias": (24,)}


def scenarios() -> dict[str, dict]:
    """name -> (optimizer record name, projector, variant, state_bits)."""
    out = {}
    for name, record in OPTIMIZERS.items():
        if record.any_projector:
            default = record.cls.default_projector
            out[f"{name}-{default}"] = {"optimizer": name, "projector": default,
                                        "variant": "default", "bits": None}
        else:
            out[name] = {"optimizer": name, "projector": "flora", "variant": "default",
                         "bits": None}
    for projector, precord in PROJECTORS.items():
        for variant in precord.variants:
            out[f"SubspaceAdamW-{projector}-{variant}"] = {
                "optimizer": "SubspaceAdamW", "projector": projector, "variant": variant,
                "bits": None}
    for bits in (32, 16, 8):
        out[f"SubspaceAdamW-galore-bits{bits}"] = {"optimizer": "SubspaceAdamW",
                                                  "projector": "galore", "variant": "default",
                                                  "bits": bits}
    for name in ("SubspaceAdafactor", "SubspaceLion"):
        for projector in ("grass", "dct"):
            out[f"{name}-{projector}"] = {"optimizer": name, "projector": projector,
                                          "variant": "default", "bits": None}
    return out


def run(spec: dict, steps: int = STEPS, dtype: torch.dtype = torch.float64,
        **kwargs) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """Train the scenario in ``dtype``; ``kwargs`` go to the constructor (e.g.
    ``foreach``)."""
    record = OPTIMIZERS[spec["optimizer"]]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.nn.Parameter(portable_randn(*s, generator=gen, dtype=dtype))
              for k, s in SHAPES.items()}
    streams = {k: [g.to(dtype) for g in gradient_stream(s, steps, seed=i, dtype=dtype)]
               for i, (k, s) in enumerate(SHAPES.items())}
    group = {"params": [params["wide"], params["tall"], params["cube"]], "rank": 4,
             "update_proj_gap": 5}
    if record.any_projector:
        group.update(PROJECTORS[spec["projector"]].group(spec["variant"]))
    extra = {} if spec["bits"] is None else {"state_bits": spec["bits"]}
    opt = record.make([{"params": [params["bias"]]}, group], **extra, **kwargs)
    for step in range(steps):
        for k, p in params.items():
            p.grad = None if (k == "cube" and step == 7) else streams[k][step].clone()
        opt.step()
    return params, opt


def _tensors(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer):
    for name, p in params.items():
        yield name, p.detach()
        for key in sorted(opt.state[p]):
            value = opt.state[p][key]
            if torch.is_tensor(value) and key.startswith("exp_avg"):
                yield f"{name}.{key}", value.detach()


def _probes(numel: int, count: int = PROBES) -> torch.Tensor:
    return torch.randn(count, numel, generator=torch.Generator().manual_seed(numel),
                       dtype=torch.float64)


def precision(spec: dict, opt: torch.optim.Optimizer) -> str:
    """``"float32"`` where the scenario computes part of its step in float32 by design (a
    state tensor of another dtype than float64, or Flora's and APOLLO's Gaussian basis,
    drawn in float32 with either generator), else ``"float64"``."""
    if spec["projector"] in ("flora", "apollo"):
        return "float32"
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dtype not in (torch.float64, torch.int64,
                                                               torch.int32, torch.int16,
                                                               torch.bool):
                return "float32"
    return "float64"


def fingerprint(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                spec: dict) -> dict:
    """``{"precision": ..., "tensors": {name: [numel, norm, <x, v_1>, ..., <x, v_4>]}}``
    in float64 (8-bit moments as their codes)."""
    tensors = {}
    for name, value in _tensors(params, opt):
        x = value.reshape(-1).double()
        tensors[name] = [x.numel(), x.norm().item(), *(_probes(x.numel()) @ x).tolist()]
    return {"precision": precision(spec, opt), "tensors": tensors}


def mismatches(got: dict, recorded: dict) -> list[str]:
    """What differs by more than the scenario's tolerance of its scale: the norm, times the
    probe vector's norm for an inner product (which it bounds)."""
    if got["precision"] != recorded["precision"]:
        return [f"precision {got['precision']}, recorded {recorded['precision']}"]
    tolerance = TOLERANCE if got["precision"] == "float64" else TOLERANCE_FP32
    got, recorded = got["tensors"], recorded["tensors"]
    if set(got) != set(recorded):
        return [f"tensors {sorted(set(got) ^ set(recorded))}"]
    bad = []
    for name, (numel, *values) in got.items():
        if numel != recorded[name][0]:
            bad.append(f"{name}: {numel} elements, recorded {recorded[name][0]}")
            continue
        norm = max(abs(values[0]), abs(recorded[name][1]))
        scales = [norm, *(norm * v for v in _probes(int(numel)).norm(dim=1).tolist())]
        for i, (a, b, scale) in enumerate(zip(values, recorded[name][1:], scales,
                                              strict=True)):
            if abs(a - b) > tolerance * scale:
                bad.append(f"{name}[{i}]: {a!r} against the recorded {b!r}")
    return bad


def main() -> None:
    PATH.parent.mkdir(exist_ok=True)
    result = {name: fingerprint(*run(spec, foreach=False), spec)
              for name, spec in scenarios().items()}
    PATH.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
