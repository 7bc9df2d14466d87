"""Optimizer-state bytes and steady step time of every optimizer of this library against
the peers, on one transformer block of LLaMA-130M (rank 256) and LLaMA-1B (rank 512):
torch's AdamW (foreach and fused), bitsandbytes' AdamW8bit, torchao's AdamW8bit and
AdamW4bit, Adam-mini, galore-torch's GaLoreAdamW and GaLoreAdamW8bit, q-galore-torch's
QGaLoreAdamW8bit, apollo-torch's APOLLOAdamW (channel scaling at the block's rank, and
APOLLO-Mini: rank 1, tensor scaling, scale 128) and fira's FiraAdamW, each where it runs
here. This library's APOLLO-Mini runs at rank 1 and scale 128 too.

Every optimizer gets its own copy of the block's weights and one fixed gradient per
weight; a first step (refreshes: SVDs, selections) runs outside the timing and the gap is
longer than the run, so what is timed is the steady step. Steps are interleaved in a new
random order each round; the figures are medians, and ratios to torch's AdamW (foreach),
to galore-torch's GaLoreAdamW and to the two matrix products a projected step cannot avoid
(``benchmarks/step_floor.py``), all in the same run. State bytes are counted from the
tensors each optimizer holds (for galore-torch, also inside its projector objects).

    python benchmarks/peers.py            # benchmarks/results/peers.csv
    python benchmarks/peers.py --smoke    # tiny shapes, 2 rounds (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import interleaved_medians, progress, results_path, write_csv  # noqa: E402
from step_floor import _floor  # noqa: E402

import subspace_optim as so  # noqa: E402

BLOCKS = {
    "LLaMA-130M block": ([(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)], 256),
    "LLaMA-1B block": ([(2048, 2048)] * 4 + [(5461, 2048)] * 2 + [(2048, 5461)], 512),
}
SMOKE = {"smoke": ([(48, 48)] * 2 + [(96, 48), (48, 96)], 16)}
GAP = 10**6
SMALL_GROUP = {"quant_group_size": 64}  # Q-GaLore's INT4 groups on smoke-sized bases


def _params(shapes: list[tuple[int, int]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def state_bytes(value, seen=None) -> int:
    """Bytes of every tensor reachable from ``value`` (dicts, lists, objects' attributes),
    each storage once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            # torchao's low-bit states: a subclass whose bytes are its inner tensors
            return sum(state_bytes(getattr(value, n), seen)
                       for n in value.__tensor_flatten__()[0])
        key = (value.untyped_storage().data_ptr(), value.device)
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(state_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(state_bytes(v, seen) for v in vars(value).values())
    return 0


def _ours(shapes, rank, smoke) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    out = {}
    for name in so.__all__:
        cls = getattr(so, name)
        if not (isinstance(cls, type) and issubclass(cls, so.SubspaceOptimizer)) or \
                cls is so.SubspaceOptimizer:
            continue

        def make(params, cls=cls, name=name):
            group = {"params": params, "rank": rank, "update_proj_gap": GAP}
            kwargs = {"lr": 1e-5}
            if name == "FloraAdafactor":
                return cls([group], **kwargs)
            group["scale"] = 0.25
            if "QGaLore" in name and smoke:
                group.update(SMALL_GROUP)
            if name == "ApolloMiniAdamW":
                group.update(rank=1, scale=128.0)
            if "Adafactor" in name:
                kwargs.update(relative_step=False, scale_parameter=False)
            return cls([group], **kwargs)

        out[name] = make
    return out


# Adam-mini partitions by parameter name: the block's weights named as in a LLaMA layer.
LLAMA_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _adam_mini(params):
    from adam_mini import Adam_mini

    names = LLAMA_NAMES if len(params) == len(LLAMA_NAMES) else \
        [f"mlp.{i}_proj" for i in range(len(params))]
    hidden = min(params[0].shape)
    heads = max(1, hidden // 64)
    named = [(f"model.layers.0.{n}.weight", p) for n, p in zip(names, params, strict=True)]
    return Adam_mini(named, lr=1e-5, dim=hidden, n_heads=heads, n_kv_heads=heads,
                     verbose=False)


def _peers(rank) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    out = {
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-5, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True),
    }
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-5)
    except ImportError:
        pass
    try:
        import torchao.optim as ao

        out["torchao AdamW8bit"] = lambda ps: ao.AdamW8bit(ps, lr=1e-5)
        out["torchao AdamW4bit"] = lambda ps: ao.AdamW4bit(ps, lr=1e-5)
    except ImportError:
        pass
    try:
        import adam_mini  # noqa: F401

        out["adam_mini Adam_mini"] = _adam_mini
    except ImportError:
        pass
    try:
        import apollo_torch

        def apollo(r, scale_type, scale):
            return lambda ps: apollo_torch.APOLLOAdamW(
                [{"params": ps, "rank": r, "proj": "random", "scale_type": scale_type,
                  "scale": scale, "update_proj_gap": GAP, "proj_type": "std"}], lr=1e-5)

        out["apollo_torch APOLLOAdamW"] = apollo(rank, "channel", 1.0)
        out["apollo_torch APOLLO-Mini"] = apollo(1, "tensor", 128.0)
    except ImportError:
        pass
    try:
        import fira

        out["fira FiraAdamW"] = lambda ps: fira.FiraAdamW(
            [{"params": ps, "rank": rank, "update_proj_gap": GAP, "alpha": 0.25,
              "proj_type": "std"}], lr=1e-5)
    except ImportError:
        pass
    try:
        import galore_torch

        def galore(cls):
            return lambda ps: cls([{"params": ps, "rank": rank, "update_proj_gap": GAP,
                                    "scale": 0.25, "proj_type": "std"}], lr=1e-5)

        out["galore_torch GaLoreAdamW"] = galore(galore_torch.GaLoreAdamW)
        out["galore_torch GaLoreAdamW8bit"] = galore(galore_torch.GaLoreAdamW8bit)
    except ImportError:
        pass
    try:
        import q_galore_torch

        def q_galore(cls):
            return lambda ps: cls(
                [{"params": ps, "rank": rank, "update_proj_gap": GAP, "scale": 0.25,
                  "proj_type": "std", "quant": True, "quant_n_bit": 4, "quant_group_size": 256,
                  "cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5}], lr=1e-5)

        out["q_galore_torch QGaLoreAdamW8bit"] = q_galore(q_galore_torch.QGaLoreAdamW8bit)
        out["q_galore_torch QGaLoreAdamW8bit_simulate"] = q_galore(
            q_galore_torch.QGaLoreAdamW8bit_simulate)
    except ImportError:
        pass
    return out


def measure(block: str, shapes, rank: int, rounds: int, smoke: bool) -> list[dict]:
    steps: dict[str, Callable[[], None]] = {"two-GEMM floor": _floor(_params(shapes), rank)}
    held: dict[str, int | str] = {"two-GEMM floor": ""}
    skipped = {}
    makers = {**_ours(shapes, rank, smoke), **_peers(rank)}
    for name, make in progress(makers.items(), f"{block}: first steps", "optimizer"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make(_params(shapes))
                opt.step()  # the refreshes, outside the timing
        except Exception as error:  # a peer that does not run on this machine
            skipped[name] = f"{type(error).__name__}: {str(error)[:120]}"
            continue
        steps[name] = opt.step
        held[name] = state_bytes(opt.state)
    print(f"{block}: timing {len(steps)} steps x {rounds} rounds", flush=True)
    medians = interleaved_medians(steps, rounds)
    adamw = medians.get("torch AdamW (foreach)")
    galore = medians.get("galore_torch GaLoreAdamW")
    floor = medians["two-GEMM floor"]
    rows = []
    for name, m in medians.items():
        rows.append({"block": block, "rank": rank, "optimizer": name,
                     "state_bytes": held[name], "median_ms": round(m * 1e3, 3),
                     "vs_torch_adamw": round(m / adamw, 3) if adamw else "",
                     "vs_galore_torch": round(m / galore, 3) if galore else "",
                     "vs_two_gemm_floor": round(m / floor, 3), "rounds": rounds, "note": ""})
    for name, why in skipped.items():
        rows.append({"block": block, "rank": rank, "optimizer": name, "state_bytes": "",
                     "median_ms": "", "vs_torch_adamw": "", "vs_galore_torch": "",
                     "vs_two_gemm_floor": "", "rounds": 0, "note": f"does not run: {why}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None,
                        help="CSV to write (default benchmarks/results/peers.csv; a smoke run "
                             "writes to the temporary directory)")
    args = parser.parse_args()
    blocks, rounds = (SMOKE, 2) if args.smoke else (BLOCKS, args.rounds)
    rows = []
    for block, (shapes, rank) in blocks.items():
        rows += measure(block, shapes, rank, rounds, args.smoke)
    print("| block | optimizer | state (MiB) | step (ms) | / torch AdamW | / galore-torch | "
          "/ two-GEMM floor |\n|---|---|---|---|---|---|---|")
    for r in rows:
        mib = f"{r['state_bytes'] / 2**20:.1f}" if isinstance(r["state_bytes"], int) else ""
        print(f"| {r['block']} | {r['optimizer']} | {mib} | {r['median_ms']} | "
              f"{r['vs_torch_adamw']} | {r['vs_galore_torch']} | {r['vs_two_gemm_floor']} | "
              f"{r['note']}")
    print(write_csv(results_path(args.out, "benchmarks/results/peers.csv", args.smoke), rows))


if __name__ == "__main__":
    main()
