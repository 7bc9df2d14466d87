"""A small training run that can stop, save and resume; run as a script by
test_checkpoint.py so that the resumed half starts in a fresh Python process.

    python resume_worker.py OUT STEPS [--save-at K CKPT] [--resume CKPT]

Writes the final parameters and optimizer state to OUT (torch.save).
"""

from __future__ import annotations

import argparse

import torch

from subspace_optim import SubspaceAdamW


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)
    )
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = SubspaceAdamW(
        [
            {"params": vectors},
            {"params": matrices, "rank": 4, "update_proj_gap": 3, "scale": 0.5},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    return model, opt


def batches():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 10, 16, generator=gen), torch.randn(64, 10, 8, generator=gen)


def train(model, opt, start, stop):
    xs, ys = batches()
    for step in range(start, stop):
        # Dropout-like noise from the global generator: resume must restore RNG state too.
        x = xs[step] + 0.01 * torch.randn_like(xs[step])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), ys[step]).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("steps", type=int)
    parser.add_argument("--save-at", nargs=2)
    parser.add_argument("--resume")
    args = parser.parse_args()
    model, opt = build()
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
    stop = int(args.save_at[0]) if args.save_at else args.steps
    train(model, opt, start, stop)
    if args.save_at:
        torch.save(
            {"model": model.state_dict(), "optim": opt.state_dict(),
             "rng": torch.get_rng_state(), "step": stop},
            args.save_at[1],
        )
        return
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, args.out)


if __name__ == "__main__":
    main()
