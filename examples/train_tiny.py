"""The main job until `subspace-optim train` exists: a small MLP learns a teacher network
with GaLoreAdamW (projected hidden matrices, plain AdamW for biases), and the same run
with torch.optim.AdamW is printed beside it for comparison. Runs in seconds on a CPU.

    python examples/train_tiny.py [--steps 300] [--rank 16]
"""

from __future__ import annotations

import argparse

import torch

from subspace_optim import GaLoreAdamW, optimizer_state_bytes


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 16),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    teacher = make_model(seed=1)
    runs = {}
    for name in ("GaLoreAdamW", "torch AdamW"):
        model = make_model(seed=0)
        if name == "GaLoreAdamW":
            hidden = [p for p in model.parameters() if p.dim() == 2]
            rest = [p for p in model.parameters() if p.dim() < 2]
            opt = GaLoreAdamW(
                [{"params": rest},
                 {"params": hidden, "rank": args.rank, "update_proj_gap": 50, "scale": 1.0}],
                lr=3e-3,
            )
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(args.steps):
            x = torch.randn(128, 64, generator=gen)
            with torch.no_grad():
                y = teacher(x)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[name] = (losses, optimizer_state_bytes(opt))

    print(f"{'step':>6}  " + "  ".join(f"{name:>12}" for name in runs))
    for step in list(range(0, args.steps, max(1, args.steps // 10))) + [args.steps - 1]:
        print(f"{step + 1:>6}  " + "  ".join(f"{runs[n][0][step]:>12.5f}" for n in runs))
    print("optimizer state (bytes): " + ", ".join(f"{n} {b:,}" for n, (_, b) in runs.items()))


if __name__ == "__main__":
    main()
