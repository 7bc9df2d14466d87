"""Fingerprints of every optimizer's results, recorded from the per-tensor code before the
step engine was rebuilt: the reference path must reproduce them bit for bit.

``python tests/golden.py`` rewrites ``tests/data/golden.json``. It is run only when a change
of results is intended (and said so in the README): Flora's projection matrix and the
stochastic rounding of INT8 weights moved to counter-based generators, whose scenarios were
recorded again at that change.

Each scenario trains a wide, a tall and a 3-D matrix (projected) and a bias (full rank) for
40 steps of a fixed gradient stream with refreshes every 5 steps; the 3-D matrix gets no
gradient at step 7. The fingerprint is the SHA-256 of the final parameters' bytes and of the
rule's moments (``exp_avg*``; a projector's bookkeeping may change representation, e.g. a
tensor counter becoming an int, without changing any result).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from optim_db import OPTIMIZERS, PROJECTORS  # noqa: E402
from references import gradient_stream  # noqa: E402

PATH = Path(__file__).parent / "data" / "golden.json"
STEPS = 40
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


def run(spec: dict, steps: int = STEPS, **kwargs) -> tuple[dict[str, torch.Tensor],
                                                           torch.optim.Optimizer]:
    """Train the scenario; ``kwargs`` go to the constructor (e.g. ``foreach``)."""
    record = OPTIMIZERS[spec["optimizer"]]
    torch.manual_seed(0)
    params = {k: torch.nn.Parameter(torch.randn(s)) for k, s in SHAPES.items()}
    streams = {k: gradient_stream(s, steps, seed=i) for i, (k, s) in enumerate(SHAPES.items())}
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


def fingerprint(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> str:
    digest = hashlib.sha256()
    for p in params.values():
        digest.update(p.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        for key in sorted(opt.state[p]):
            value = opt.state[p][key]
            if torch.is_tensor(value) and key.startswith("exp_avg"):
                digest.update(key.encode())
                digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    PATH.parent.mkdir(exist_ok=True)
    result = {name: fingerprint(*run(spec, foreach=False)) for name, spec in scenarios().items()}
    PATH.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
