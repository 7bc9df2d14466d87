"""Independent, readable references of the updates the library implements.

Written from the papers' algorithms for one matrix at a time, as loops over steps, sharing
no code with ``subspace_optim`` so that a bug there cannot hide in both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adamw_reference(
    w0: Tensor,
    grads: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> Tensor:
    """torch.optim.AdamW's documented algorithm (Loshchilov & Hutter), bias-corrected."""
    beta1, beta2 = betas
    w = w0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    return w


def galore_side(shape: tuple[int, int], proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def galore_adamw_reference(
    w0: Tensor,
    grads: list[Tensor],
    *,
    rank: int,
    gap: int,
    scale: float,
    proj_type: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    convention: str,
) -> Tensor:
    """GaLore (Zhao et al. 2024, Algorithm 2) with its AdamW inner rule, on one matrix.

    Every ``gap`` steps: U, S, Vh = SVD(G); P = Vh[:r] (project on the right, R = G P^T)
    or U[:, :r] (on the left, R = P^T G). Adam runs on R; the update scale * P-back(N)
    is applied with decoupled weight decay. ``convention`` "galore" is galore-torch's
    arithmetic (eps added to sqrt(v) before bias correction, decay after the update);
    "torch" is torch.optim.AdamW's (bias-corrected moments, decay before the update).
    """
    beta1, beta2 = betas
    side = galore_side(tuple(w0.shape), proj_type)
    w = w0.clone()
    p = m = v = None
    for step, g in enumerate(grads):
        if step % gap == 0:
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            p = (vh[:rank] if side == "right" else u[:, :rank]).to(g.dtype)
        r = g @ p.T if side == "right" else p.T @ g
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * r * r
        t = step + 1
        if convention == "galore":
            n = m / (v.sqrt() + eps) * (math.sqrt(1 - beta2**t) / (1 - beta1**t))
        else:
            n = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        update = scale * (n @ p if side == "right" else p @ n)
        if convention == "galore":
            w = w - lr * update
            w = w - lr * weight_decay * w
        else:
            w = w * (1 - lr * weight_decay)
            w = w - lr * update
    return w


def gradient_stream(shape: tuple[int, ...], steps: int, seed: int) -> list[Tensor]:
    """Gradients with a slowly drifting dominant low-rank part plus noise, like a real
    layer's, so that the top singular subspace is well separated and changes over time."""
    gen = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = math.prod(shape[1:])
    k = max(1, min(m, n) // 2)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    out = []
    for _ in range(steps):
        a = a + 0.05 * torch.randn(m, k, generator=gen)
        g = a @ b / math.sqrt(k) + 0.1 * torch.randn(m, n, generator=gen)
        out.append(g.reshape(shape))
    return out
