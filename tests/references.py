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
    correct_bias: bool = True,
) -> Tensor:
    """torch.optim.AdamW's documented algorithm (Loshchilov & Hutter), bias-corrected unless
    ``correct_bias`` is False (transformers' flag: the raw moments are used)."""
    beta1, beta2 = betas
    w = w0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t) if correct_bias else m
        v_hat = v / (1 - beta2**t) if correct_bias else v
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
            # In float32 at least (galore-torch's), in float64 for a float64 test.
            work = torch.promote_types(g.dtype, torch.float32)
            u, _, vh = torch.linalg.svd(g.to(work), full_matrices=False)
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


def run_steps(opt, p, grads: list[Tensor]) -> Tensor:
    """Feed ``grads`` to ``opt`` one step each as ``p``'s gradient; ``p``'s final value."""
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def distill(model, teacher, opt, steps: int, batch: int, dim: int, seed: int = 1) -> list[float]:
    """Train ``model`` to match ``teacher`` on Gaussian inputs (seeded); the step losses."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def portable_randn(*shape: int, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Draws of mean 0 and variance 1 that are the same numbers on every CPU: the sum of
    12 uniforms minus 6 (Irwin-Hall). torch.randn's vectorised Box-Muller is not portable
    (its log and cos round differently with and without AVX: ATEN_CPU_CAPABILITY=default
    moves its draws by 1e-6); torch.rand's float32 uniforms are, and their sum, 24-bit
    numbers in float64, is exact in any order."""
    u = torch.rand(*shape, 12, generator=generator, dtype=torch.float32)
    return (u.double().sum(-1) - 6).to(dtype)


def gradient_stream(shape: tuple[int, ...], steps: int, seed: int,
                    dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Gradients with a slowly drifting dominant low-rank part plus noise, like a real
    layer's, so that the top singular subspace is well separated and changes over time.
    The draws are the same numbers on any CPU and in any ``dtype`` (``portable_randn``);
    the arithmetic is in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = math.prod(shape[1:])
    k = max(1, min(m, n) // 2)

    def draw(*size):
        return portable_randn(*size, generator=gen, dtype=dtype)

    a = draw(m, k)
    b = draw(k, n)
    out = []
    for _ in range(steps):
        a = a + 0.05 * draw(m, k)
        g = a @ b / math.sqrt(k) + 0.1 * draw(m, n)
        out.append(g.reshape(shape))
    return out


# --------------------------------------------------------------------------- shared pieces
def _adam_torch(m, v, r, t, betas, eps):
    """torch-style Adam moments and normalised step on a projected gradient r (returns
    new m, v and the direction m_hat / (sqrt(v_hat) + eps))."""
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * r
    v = beta2 * v + (1 - beta2) * r * r
    n = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return m, v, n


def _side(shape):
    return "right" if shape[0] >= shape[1] else "left"


def _project(p, g, side):
    return g @ p.T if side == "right" else p.T @ g


def _back(p, n, side):
    return n @ p if side == "right" else p @ n


# --------------------------------------------------------------------------- DCT
def dct2_matrix(d: int) -> Tensor:
    """Orthonormal DCT-II basis vectors as columns, element by element from the definition."""
    q = torch.empty(d, d, dtype=torch.float64)
    for j in range(d):
        for k in range(d):
            c = math.sqrt(1 / d) if k == 0 else math.sqrt(2 / d)
            q[j, k] = c * math.cos(math.pi * k * (2 * j + 1) / (2 * d))
    return q.float()


def dct_adamw_reference(w0, grads, *, rank, gap, lr, betas, eps, weight_decay, rotate):
    """DCT-AdamW (Modoranu et al. 2025): at a refresh score the DCT-II columns by the l1 norm
    of G Q (rows of Q^T G on the left), keep the top r; Adam (torch arithmetic) on the
    projection; optional rotation of the moments by Q_old^T Q_new."""
    side = _side(tuple(w0.shape))
    d = min(w0.shape)
    q = dct2_matrix(d)
    w = w0.clone()
    cols = m = v = None
    for step, g in enumerate(grads):
        if step % gap == 0:
            s = g @ q if side == "right" else q.T @ g
            scores = s.abs().sum(dim=0 if side == "right" else 1)
            idx = sorted(torch.topk(scores, rank).indices.tolist())
            new_cols = q[:, idx]
            if rotate and cols is not None:
                rot = cols.T @ new_cols  # r x r: Q_old^T Q_new
                if side == "right":
                    m, v = m @ rot, (v @ rot).abs()
                else:
                    m, v = rot.T @ m, (rot.T @ v).abs()
            cols = new_cols
        p = cols.T if side == "right" else cols  # r x n or m x r
        r = _project(p, g, side)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m, v, n = _adam_torch(m, v, r, step + 1, betas, eps)
        w = w * (1 - lr * weight_decay) - lr * _back(p, n, side)
    return w


# --------------------------------------------------------------------------- OSD
def osd_reference(w0, grads, *, rank, gap, scale, lr, eps, weight_decay, paper=False,
                  ortho_penalty=0.1, lr_ratio=5.0):
    """Online Subspace Descent as its reference code runs it: SVD basis at step 0; each later
    step projects with P_t, back-projects, then takes one torch.optim.AdamW step (lr 1/T,
    its default weight decay 0.01) on ||A P^T P - A||^2 (right) / ||P P^T A - A||^2 (left)
    computed by autograd, A = G / ||G||. W's rule is galore-torch's AdamW. ``paper``:
    Algorithm 1 instead: the loss adds ortho_penalty * ||P P^T - I||^2 (P^T P on the left),
    P's AdamW has lr lr_ratio * lr and W's weight decay."""
    side = _side(tuple(w0.shape))
    w = w0.clone()
    p = p_opt = m = v = None
    for step, g in enumerate(grads):
        if p is None:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = (vh[:rank] if side == "right" else u[:, :rank]).clone().requires_grad_(False)
            p_opt = (torch.optim.AdamW([p], lr=lr_ratio * lr, weight_decay=weight_decay)
                     if paper else torch.optim.AdamW([p], lr=1 / gap))
            pca_grad = None
        else:
            with torch.enable_grad():
                pv = p.detach().requires_grad_(True)
                a = g / g.norm()
                recon = a @ pv.T @ pv if side == "right" else pv @ pv.T @ a
                loss = (recon - a).norm() ** 2
                if paper:
                    gram = pv @ pv.T if side == "right" else pv.T @ pv
                    loss = loss + ortho_penalty * (gram - torch.eye(rank)).norm() ** 2
                (pca_grad,) = torch.autograd.grad(loss, pv)
        r = _project(p, g, side)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = 0.9 * m + 0.1 * r
        v = 0.999 * v + 0.001 * r * r
        t = step + 1
        n = m / (v.sqrt() + eps) * (math.sqrt(1 - 0.999**t) / (1 - 0.9**t))
        w = w - lr * scale * _back(p, n, side)
        w = w - lr * weight_decay * w
        if pca_grad is not None:
            p.grad = pca_grad
            p_opt.step()
            p.grad = None
    return w


# --------------------------------------------------------------------------- Flora
def flora_next_seed(seed: int) -> int:
    """Flora's rule: the 15th int64 draw of a CPU generator seeded with the old seed."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, 2**63 - 1, (15,), generator=gen)[14])


_M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 integer hash, on Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def counter_uniforms(seed: int, counter: int, stream: int = 0) -> tuple[float, float]:
    """The two uniforms of the library's counter-based normal (subspace_optim.counter_rng),
    from its definition with Python integers: a key from (seed, stream), two 32-bit hashes of
    the counter, their top 24 bits plus half a step (exact float32 values)."""
    k = _lowbias32((seed & _M32) ^ 0x9E3779B9)
    k = _lowbias32(k ^ ((seed >> 32) & _M32))
    k = _lowbias32(k ^ (stream & _M32))
    k = _lowbias32(k ^ ((stream >> 32) & _M32) ^ 0xBB67AE85)
    h1 = _lowbias32((counter & _M32) ^ k)
    h1 = _lowbias32(h1 ^ (counter >> 32) ^ 0x9E3779B9)
    h2 = _lowbias32(h1 ^ 0xBB67AE85)
    return ((h1 >> 8) + 0.5) * 2.0**-24, ((h2 >> 8) + 0.5) * 2.0**-24


def counter_normals(seed: int, counters: list[int]) -> Tensor:
    """Box-Muller on those uniforms, in float32 as the definition says."""
    u = torch.tensor([counter_uniforms(seed, c) for c in counters], dtype=torch.float32)
    return torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])


def flora_matrix(seed: int, shape, rank: int) -> Tensor:
    """Flora's A, N(0, 1/r): r x m for m < n, n x r otherwise. The library defines it as the
    transpose of its dense basis B (m x r left, r x n right), whose element (i, j) is the
    counter-based normal of counter i * cols(B) + j."""
    m, n = shape
    rows, cols = (m, rank) if m < n else (rank, n)
    b = counter_normals(seed, list(range(rows * cols))).view(rows, cols)
    return (b / math.sqrt(rank)).T


def flora_maps(shape):
    """Flora's compression and decompression with A: (A X, A^T Y) for m < n, else (X A, Y A^T)."""
    if shape[0] < shape[1]:
        return (lambda a, x: a @ x), (lambda a, y: a.T @ y)
    return (lambda a, x: x @ a), (lambda a, y: y @ a.T)


def flora_adamw_reference(w0, grads, *, rank, kappa, seed, lr, betas, eps, weight_decay):
    """AdamW on Flora's compression down(G) (A G on the left, G A on the right) with
    update up(N) (A^T N or N A^T). Every kappa steps the seed advances and both moments
    move: m <- down_new(up_old(m)), v <- |down_new(up_old(v))|."""
    shape = tuple(w0.shape)
    down, up = flora_maps(shape)

    w = w0.clone()
    a = flora_matrix(seed, shape, rank)
    m = v = None
    for step, g in enumerate(grads):
        if step > 0 and step % kappa == 0:
            seed = flora_next_seed(seed)
            a_new = flora_matrix(seed, shape, rank)
            m = down(a_new, up(a, m))
            v = down(a_new, up(a, v)).abs()
            a = a_new
        r = down(a, g)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m, v, n = _adam_torch(m, v, r, step + 1, betas, eps)
        w = w * (1 - lr * weight_decay) - lr * up(a, n)
    return w


def flora_adafactor_reference(w0, grads, *, rank, kappa, seed, lr, beta1, decay_rate, eps,
                              clip_threshold, weight_decay):
    """Flora (Algorithm in Hao et al. 2024, as flora-opt runs it) for one matrix: factored
    Adafactor on the full gradient, momentum kept as down(M) in a seeded subspace."""
    shape = tuple(w0.shape)
    down, up = flora_maps(shape)
    left = shape[0] < shape[1]

    def rms(x):
        return x.norm() / math.sqrt(x.numel())

    w = w0.clone()
    row = torch.zeros(shape[0])
    col = torch.zeros(shape[1])
    a = flora_matrix(seed, shape, rank)
    mc = torch.zeros((rank, shape[1]) if left else (shape[0], rank))
    for t, g in enumerate(grads, start=1):
        lr_t = lr * max(eps[1], rms(w).item())
        b2 = 1 - t**decay_rate
        sq = g * g + eps[0]
        row = b2 * row + (1 - b2) * sq.mean(dim=1)
        col = b2 * col + (1 - b2) * sq.mean(dim=0)
        v_hat = torch.outer(row, col) / row.mean()
        u = g / v_hat.sqrt()
        update = (1 - beta1) * u + beta1 * up(a, mc)
        if t % kappa == 0:
            seed = flora_next_seed(seed)
            a_new = flora_matrix(seed, shape, rank)
            mc = down(a_new, up(a, mc))
            a = a_new
        mc = beta1 * mc + (1 - beta1) * down(a, u)
        update = update / max(1.0, rms(update).item() / clip_threshold)
        w = w - weight_decay * lr_t * w - lr_t * update
    return w


# --------------------------------------------------------------------------- Grass
def grass_topk_reference(w0, grads, *, rank, gap, scale, lr, betas, eps, weight_decay):
    """Grass with top-r row selection (columns on the right side), unit scaling, Adam on the
    selected rows, moments reset at every refresh, update scattered back into those rows."""
    side = _side(tuple(w0.shape))
    w = w0.clone()
    idx = m = v = None
    t = 0
    for step, g in enumerate(grads):
        gm = g if side == "left" else g.T  # rows to select are rows of gm
        if step % gap == 0:
            idx = sorted(torch.topk((gm * gm).sum(dim=1), rank).indices.tolist())
            m = v = None
            t = 0
        r = gm[idx]
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        t += 1
        m, v, n = _adam_torch(m, v, r, step + 1, betas, eps)
        update = torch.zeros_like(gm)
        update[idx] = n
        w = w * (1 - lr * weight_decay) - lr * scale * (update if side == "left" else update.T)
    return w


# --------------------------------------------------------------------------- Q-GaLore
def groupwise_roundtrip(x: Tensor, group_size: int, bits: int = 4) -> Tensor:
    """Group-wise asymmetric quantise-dequantise with zero inside every group's range."""
    qmax = 2**bits - 1
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), group_size):
        grp = flat[start:start + group_size]
        lo = min(grp.min().item(), 0.0)
        hi = max(grp.max().item(), 0.0)
        s = torch.tensor(max(hi - lo, 1e-5), dtype=torch.float32) / qmax
        z = torch.round(torch.tensor(-lo, dtype=torch.float32) / s).clamp(0, qmax)
        q = (torch.round(grp / s) + z).clamp(0, qmax)
        out[start:start + group_size] = (q - z) * s
    return out.reshape(x.shape)


def q_galore_reference(w0, grads, *, rank, gap, scale, lr, betas, eps, weight_decay,
                       group_size=256, bits=4, queue_size=5, cos_threshold=0.4, gamma=2):
    """Q-GaLore: GaLore whose basis is used through an INT4 (or INT8) round trip, refreshed when
    step % gap == 0 with a per-layer gap that doubles once the mean of the last 5 cosines
    between consecutive first singular vectors reaches 0.4."""
    side = _side(tuple(w0.shape))
    w = w0.clone()
    p = m = v = None
    queue: list[float] = []
    for step, g in enumerate(grads):
        if p is None or step % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new = vh[:rank] if side == "right" else u[:, :rank]
            if p is not None:
                old_first = p[0] if side == "right" else p[:, 0]
                new_first = new[0] if side == "right" else new[:, 0]
                cos = torch.nn.functional.cosine_similarity(old_first, new_first, dim=0).item()
                queue = (queue + [cos])[-queue_size:]
                if len(queue) == queue_size and sum(queue) / queue_size >= cos_threshold:
                    gap = int(gap * gamma)
            p = groupwise_roundtrip(new, group_size, bits)
        r = _project(p, g, side)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m, v, n = _adam_torch(m, v, r, step + 1, betas, eps)
        w = w * (1 - lr * weight_decay) - lr * scale * _back(p, n, side)
    return w, gap


# --------------------------------------------------------------------------- Lion, Adafactor
def lion_reference(w0, grads, *, lr, betas, weight_decay, rank=None, gap=None, scale=1.0):
    """Lion (Chen et al. 2023, Algorithm 2), optionally in GaLore's SVD subspace."""
    beta1, beta2 = betas
    side = _side(tuple(w0.shape))
    w = w0.clone()
    m = p = None
    for step, g in enumerate(grads):
        if rank is not None and step % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = vh[:rank] if side == "right" else u[:, :rank]
        r = g if rank is None else _project(p, g, side)
        if m is None:
            m = torch.zeros_like(r)
        c = beta1 * m + (1 - beta1) * r
        update = torch.sign(c)
        m = beta2 * m + (1 - beta2) * r
        w = w * (1 - lr * weight_decay)
        w = w - lr * scale * (update if rank is None else _back(p, update, side))
    return w


def adafactor_reference(w0, grads, *, lr, beta1, relative_step, scale_parameter,
                        warmup_init=False, weight_decay=0.0, eps=(1e-30, 1e-3), clip=1.0,
                        decay_rate=-0.8, rank=None, gap=None, scale=1.0):
    """Adafactor as transformers defines it (factored second moment for matrices), optionally
    on GaLore's projected gradient with the update back-projected times ``scale``."""
    side = _side(tuple(w0.shape)) if w0.dim() == 2 else None
    w = w0.clone()
    row = col = v = m = p = None
    for t, g in enumerate(grads, start=1):
        if rank is not None and (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = vh[:rank] if side == "right" else u[:, :rank]
        r = g if rank is None else _project(p, g, side)
        rho = min(1e-6 * t if warmup_init else 1e-2, 1 / math.sqrt(t)) if relative_step else lr
        rms_w = (w.norm() / math.sqrt(w.numel())).item()
        lr_t = max(eps[1], rms_w) * rho if scale_parameter else rho
        b2 = 1 - t**decay_rate
        sq = r * r + eps[0]
        if r.dim() == 2:
            row = sq.mean(dim=1) if row is None else b2 * row + (1 - b2) * sq.mean(dim=1)
            col = sq.mean(dim=0) if col is None else b2 * col + (1 - b2) * sq.mean(dim=0)
            v_hat = torch.outer(row, col) / row.mean()
        else:
            v = sq if v is None else b2 * v + (1 - b2) * sq
            v_hat = v
        update = r / v_hat.sqrt()
        update = update / max(1.0, (update.norm() / math.sqrt(update.numel())).item() / clip)
        update = lr_t * update
        if beta1:
            m = (1 - beta1) * update if m is None else beta1 * m + (1 - beta1) * update
            update = m
        full = update if rank is None else scale * _back(p, update, side)
        w = w - weight_decay * lr_t * w - full
    return w
