"""Per-layer updates inside backward: each parameter steps as soon as its gradient is
accumulated, and its gradient is freed at once, so the model's full gradient is never held.

One optimizer object stays the single source of truth (its ``state_dict`` holds every
parameter's state, an ordinary LR scheduler drives its groups), unlike the per-parameter
optimizers and schedulers of the reference code and of transformers' layer-wise mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._validate import check_positive_int
from .optim.base import SubspaceOptimizer
from .optim.targets import PARAMETER, target_of

CLIP_MODES = ("global", "per_parameter")


class BackwardStepper:
    """The handle returned by :func:`step_in_backward`; see its docstring."""

    def __init__(self, optimizer: SubspaceOptimizer, accumulation_steps: int,
                 max_grad_norm: float | None, clip: str, ddp: Any = None) -> None:
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip = clip
        self.grad_norm: Tensor | None = None  # total norm of the last closed step
        # Reference of global clipping: the last finite total norm, saved in the optimizer's
        # state dict so that a resumed run clips its first step as the uninterrupted one.
        self.clip_norm: Tensor | None = optimizer._pending_clip_norm
        self._norm_sq: Tensor | None = None  # accumulating for the step in progress
        self._handles: list[Any] = []
        self._ddp: Any = None  # the DDP model whose communication hook steps here
        self._group_index: dict[int, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._group_index[id(p)] = index
        # Parameters frozen when the hooks were attached (no hook can be registered on them):
        # looked at again at each step, and hooked once they are trainable.
        self._frozen: list[Tensor] = []
        # GradScaler then hands its scale to optimizer.step(), which refuses the combination
        # (parameters step on scaled gradients before the scaler can check them).
        self._amp_flag = optimizer.__dict__.get("_step_supports_amp_scaling")
        optimizer._step_supports_amp_scaling = True
        if ddp is not None:
            self._attach_ddp(ddp)
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                target = target_of(p)
                if target is not PARAMETER or p.requires_grad:
                    self._hook(p)
                else:
                    self._frozen.append(p)

    def _hook(self, p: Tensor) -> None:
        # The hook fires with the accumulated gradient; for a leaf that got none (GrassLinear
        # hands its rows over directly) it does not.
        self._handles.append(target_of(p).register_grad_hook(
            p, lambda grad, p=p: self._on_grad(p, grad)))

    @torch.no_grad()
    def _hook_unfrozen(self) -> None:
        """Hook the parameters that were frozen when the hooks were attached and are
        trainable now; one that already got a gradient (this step's backward ran without a
        hook on it) steps on it here, so no update is lost."""
        unfrozen = [p for p in self._frozen if p.requires_grad]
        if not unfrozen:
            return
        from ._warn import warn_once

        warn_once("layerwise-unfrozen",
                  f"step_in_backward: {len(unfrozen)} parameter(s) frozen when it was called "
                  "are trainable now; they step inside backward from now on (this step: "
                  "at optimizer.step()). Shown once per process.")
        for p in unfrozen:
            self._frozen.remove(p)
            self._hook(p)
            if p.grad is not None:
                self._on_grad(p, p.grad)

    def _attach_ddp(self, ddp: Any) -> None:
        """Step from DDP's communication hook, on the reduced gradients of each bucket."""
        owned = set(self._group_index)
        ddp_params = [p for p in ddp.parameters() if p.requires_grad]
        missing = [p for p in ddp_params if id(p) not in owned]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) of the DDP model (first of shape "
                f"{tuple(missing[0].shape)}) are not in the optimizer; layer-wise mode under "
                "DDP steps every parameter DDP reduces")
        # DDP takes one communication hook for its lifetime: it forwards to the model's
        # current stepper, and reduces as DDP's default hook once that stepper is removed.
        if not getattr(ddp, "_subspace_hooked", False):
            ddp.register_comm_hook(ddp, _forward_to_stepper)
            ddp._subspace_hooked = True
        ddp._subspace_stepper = self
        self._ddp = ddp
        # DDP calls no hook under no_sync(): the gradient would pile up unreduced in .grad
        # and the window would miss it. Every micro-batch must be reduced (the projected
        # window then holds the sum of reduced micro-gradients, as in one process).
        for p in ddp_params:
            self._handles.append(p.register_post_accumulate_grad_hook(
                lambda _p, ddp=ddp: self._check_sync(ddp)))

    @staticmethod
    def _check_sync(ddp: Any) -> None:
        if not ddp.require_backward_grad_sync:
            raise RuntimeError(
                "step_in_backward(ddp=...) cannot run under DDP's no_sync(): accumulate by "
                "step_in_backward(accumulation_steps=k) with a synchronised backward per "
                "micro-batch instead")

    def _ddp_hook(self, _state, bucket):  # noqa: ANN001 (DDP checks these annotations)
        """All-reduce the bucket (mean over ranks), step its parameters, and hand DDP a
        buffer in which the gradients already consumed are zero, so that nothing is counted
        twice when DDP writes the buffer back to ``.grad``."""
        import torch.distributed as dist

        buffer = bucket.buffer()
        dist.all_reduce(buffer)
        buffer.div_(dist.get_world_size())
        opt = self.optimizer
        for p, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            closes = opt.state[p].get("micro_step", 0) + 1 == self.accumulation_steps
            self._on_grad(p, grad.view_as(p))
            # A full-rank parameter inside its window keeps its reduced sum in .grad.
            if closes or opt.projects(p, opt.param_groups[self._group_index[id(p)]]):
                grad.zero_()
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(buffer)
        return future

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _on_grad(self, p: Tensor, grad: Tensor) -> None:
        opt = self.optimizer
        group = opt.param_groups[self._group_index[id(p)]]
        state = opt.state[p]
        k = self.accumulation_steps
        micro = state.get("micro_step", 0) + 1
        last = micro == k
        state["micro_step"] = 0 if last else micro
        if opt.projects(p, group) and k > 1:
            opt.accumulate(p, grad, start=micro == 1, group=group)
            target_of(p).release_grad(p)
            if last:
                taken = opt.take_window(p)
                if taken is None:
                    self._record_norm(torch.tensor(math.nan))
                else:
                    window, refreshed = taken
                    opt.step_parameter(p, grad, window=self._clipped(window),
                                       refreshed=refreshed, group=group)
            return
        if not last:  # a full-rank parameter accumulates in .grad as usual
            return
        opt.step_parameter(p, self._clipped(grad), group=group)
        target_of(p).release_grad(p)

    @torch.no_grad()
    def on_projected_gradient(self, p: Tensor) -> None:
        """A projected gradient was added to ``p``'s window by a layer that never formed the
        full one (Grass's sparse path): count the micro-batch and step at the window's end."""
        opt = self.optimizer
        state = opt.state[p]
        micro = state.get("micro_step", 0) + 1
        if micro < self.accumulation_steps:
            state["micro_step"] = micro
            return
        state["micro_step"] = 0
        taken = opt.take_window(p)
        if taken is None:
            self._record_norm(torch.tensor(math.nan))
            return
        window, refreshed = taken
        opt.step_parameter(p, None, window=self._clipped(window), refreshed=refreshed,
                           group=opt.param_groups[self._group_index[id(p)]])

    def _clipped(self, grad: Tensor) -> Tensor:
        """Record the gradient's norm for the step and clip it: per parameter by its own
        norm, or globally by the previous step's total norm (the current total is only
        known once backward has finished, after every parameter has stepped)."""
        # At least fp32 (bf16 gradients), never below the gradient's own precision.
        norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        self._record_norm(norm)
        if self.max_grad_norm is None:
            return grad
        reference = norm if self.clip == "per_parameter" else self.clip_norm
        if reference is None:  # first step of global clipping: no previous norm yet
            return grad
        factor = (self.max_grad_norm / (reference + 1e-6)).clamp(max=1.0)
        return grad * factor.to(grad.dtype)

    def _record_norm(self, norm: Tensor) -> None:
        norm_sq = norm.square()
        self._norm_sq = norm_sq if self._norm_sq is None else self._norm_sq + norm_sq.to(
            self._norm_sq.device)

    # ------------------------------------------------------------------ control
    def close_step(self) -> None:
        """Called by ``optimizer.step()``: the step's total gradient norm becomes
        ``grad_norm`` (and the reference for global clipping of the next step)."""
        if self._frozen:
            self._hook_unfrozen()
        if self._norm_sq is not None:
            self.grad_norm = self._norm_sq.sqrt()
            self._norm_sq = None
            # A step with a NaN or inf gradient (skipped under skip_nonfinite) must not
            # become the clipping reference, or every later step would be scaled by NaN.
            # A zero reference means "not clipped" (the first step's factor is then 1).
            previous = torch.zeros_like(self.grad_norm) if self.clip_norm is None else \
                self.clip_norm.to(self.grad_norm.device)
            self.clip_norm = torch.where(torch.isfinite(self.grad_norm), self.grad_norm, previous)

    def remove(self) -> None:
        """Detach the hooks: ``optimizer.step()`` updates parameters again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._ddp is not None and getattr(self._ddp, "_subspace_stepper", None) is self:
            self._ddp._subspace_stepper = None
        if self._amp_flag is None:
            self.optimizer.__dict__.pop("_step_supports_amp_scaling", None)
        else:
            self.optimizer._step_supports_amp_scaling = self._amp_flag
        self.optimizer._backward_stepper = None
        self.optimizer._pending_clip_norm = self.clip_norm  # for a later stepper or save


def step_in_backward(
    optimizer: SubspaceOptimizer,
    accumulation_steps: int = 1,
    *,
    max_grad_norm: float | None = None,
    clip: str = "global",
    ddp: Any = None,
) -> BackwardStepper:
    """Update every parameter of ``optimizer`` inside backward, as soon as its gradient is
    ready, and free that gradient.

    accumulation_steps: with ``k > 1`` a parameter steps once every ``k`` backward passes.
        Projected parameters accumulate the *projected* gradient (r x n or m x r) in the
        optimizer state, in a subspace fixed at the window's first micro-batch (where a due
        refresh happens); their full gradient never outlives its hook. Other parameters
        accumulate in ``.grad`` as usual.
    max_grad_norm, clip: gradient clipping that works in this mode: ``"per_parameter"``
        clips each parameter's (window) gradient to ``max_grad_norm``; ``"global"`` scales
        every gradient of a step by ``min(1, max_grad_norm / norm)`` where ``norm`` is the
        previous step's total norm, an approximation (the current total is only known after
        every parameter has stepped); the first step is not clipped. For projected
        parameters with ``k > 1`` the norm is taken in the subspace (at most the full norm).

    ddp: the ``DistributedDataParallel`` model, when training under DDP: each bucket's
        parameters then step in DDP's communication hook, on the gradients averaged over
        the ranks (required when a process group of more than one rank is initialised).
        Do not wrap micro-batches in ``no_sync()`` (an error): accumulate with
        ``accumulation_steps``, every micro-batch reduced. DDP keeps its gradient buckets
        (one gradient of the model); ``gradient_as_bucket_view=True`` makes ``.grad`` alias
        them instead of doubling that memory. FSDP2-sharded parameters are refused: FSDP2
        reduce-scatters after backward, outside any hook.

    In this mode ``optimizer.step()`` does not touch the parameters: it closes the step, and
    the step's total gradient norm appears as ``handle.grad_norm`` (a tensor, for logs).
    Call it once per optimization step, as in an ordinary loop, and keep calling your LR
    scheduler's ``step()`` after it. ``optimizer.zero_grad()`` is harmless (gradients are
    already freed). ``optimizer.state_dict()`` holds every parameter's state, including a
    window in progress. ``handle.remove()`` restores ordinary stepping.
    """
    if not isinstance(optimizer, SubspaceOptimizer):
        raise TypeError(
            f"step_in_backward needs an optimizer of subspace_optim, got {type(optimizer).__name__}"
        )
    check_positive_int({"accumulation_steps": accumulation_steps}, "accumulation_steps")
    if clip not in CLIP_MODES:
        raise ValueError(f"Invalid clip: {clip!r} (expected one of {CLIP_MODES})")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                          and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be a number > 0)")
    if optimizer._backward_stepper is not None:
        raise RuntimeError(
            "step_in_backward is already active on this optimizer; remove() it first"
        )
    _check_distributed(optimizer, ddp)
    stepper = BackwardStepper(optimizer, accumulation_steps, max_grad_norm, clip, ddp)
    optimizer._backward_stepper = stepper
    return stepper


def _forward_to_stepper(ddp, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotations)
    stepper = getattr(ddp, "_subspace_stepper", None)
    if stepper is not None:
        return stepper._ddp_hook(None, bucket)
    import torch.distributed as dist

    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


def _check_distributed(optimizer: SubspaceOptimizer, ddp: Any) -> None:
    """Refuse the combinations that would step on unreduced gradients."""
    from .distributed.sharding import is_dtensor, world_size

    if any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError(
            "step_in_backward does not support FSDP2 (fully_shard) parameters: their "
            "gradients are reduce-scattered after backward, so no per-parameter hook sees a "
            "reduced gradient; use optimizer.step() (FSDP2 already frees unsharded gradients)")
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"ddp must be a DistributedDataParallel model, got "
                            f"{type(ddp).__name__}")
    elif world_size() > 1:
        raise RuntimeError(
            f"a process group of {world_size()} ranks is initialised: pass the DDP model as "
            "step_in_backward(..., ddp=model) so that parameters step on reduced gradients "
            "(without it, each rank would step on its own gradient and the replicas diverge)")
