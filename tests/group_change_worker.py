"""Run by tests/test_group_changes.py in a process of its own: for one optimizer class,
change each group key between steps to each value of ``CHANGES`` and report what happened,
one JSON line per change: ``ok`` (three more steps, finite weights, whether a warning said
the state was re-created) or ``error`` (the exception's type and message). A crash of the
process (heap corruption, a segfault) shows as the process's exit status."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from optim_db import OPTIMIZERS  # noqa: E402

CHANGES = {
    "rank": [1, 2, 6, 8, 64, 0, None],
    "projector": ["galore", "dct", "online_pca", "flora", "grass", "q_galore", "nope"],
    "proj_type": ["left", "right", "reverse_std", "std", "full"],
    "update_proj_gap": [1, 3, 0, -1],
    "scale": [0.5, 0.0],
    "state_bits": [32, 16, 8, None, 4],
    "quant_group_size": [32, 0],
    "selection": ["topk", "uniform"],
}


def _fresh(record):
    torch.manual_seed(0)
    wide = torch.nn.Parameter(torch.randn(16, 24))
    tall = torch.nn.Parameter(torch.randn(24, 16))
    bias = torch.nn.Parameter(torch.randn(16))
    group = {"params": [wide, tall], "rank": 4, "update_proj_gap": 2}
    if record.any_projector:
        group["quant_group_size"] = 16
    opt = record.make([{"params": [bias]}, group])
    return [wide, tall, bias], opt


def _steps(params, opt, n):
    for _ in range(n):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


def main(name: str) -> None:
    record = OPTIMIZERS[name]
    for key, values in CHANGES.items():
        for value in values:
            params, opt = _fresh(record)
            _steps(params, opt, 3)
            group = opt.param_groups[1]
            if value is None:
                group.pop(key, None)
            else:
                group[key] = value
            report = {"key": key, "value": value}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    _steps(params, opt, 3)
                except Exception as error:  # reported, judged by the test
                    report.update(outcome="error", type=type(error).__name__,
                                  message=str(error))
                else:
                    report.update(outcome="ok",
                                  finite=all(bool(torch.isfinite(p).all()) for p in params),
                                  recreated=any("created anew" in str(w.message)
                                                for w in caught))
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
