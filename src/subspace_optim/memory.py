"""Measured memory: the figures every memory claim of the library is built from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer


def _tensor_bytes(value: Any, shared: set | None = None) -> int:
    if isinstance(value, Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not Tensor:
            # A tensor subclass (torchao's 8-bit and 4-bit states): what it holds is its
            # inner tensors (codes, scales), not numel x element_size of the float it poses
            # as; a table they all share (torchao's qmap) is counted once.
            shared = set() if shared is None else shared
            total = 0
            for name in value.__tensor_flatten__()[0]:
                inner = getattr(value, name)
                key = inner.data_ptr()
                if key in shared:
                    continue
                if inner.numel() <= 256:  # small lookup tables may be shared
                    shared.add(key)
                total += _tensor_bytes(inner, shared)
            return total
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, shared) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, shared) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        # Another package's state may hold tensors inside objects (galore-torch's projector
        # keeps its basis in one): counted too, so that peers compare fairly.
        return sum(_tensor_bytes(v, shared) for v in vars(value).values())
    return 0


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Total bytes of every tensor held in ``optimizer.state`` (moments, bases, indices,
    seeds, quantisation scales...), counted from the tensors themselves."""
    shared: set = set()
    return sum(_tensor_bytes(state, shared) for state in optimizer.state.values())


def peak_cpu_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak)``: the most bytes of tensor memory that ``fn`` had allocated at once
    on the CPU beyond what was allocated before it, from the allocator's own record of each
    allocation and free (``torch.profiler`` with ``profile_memory``). The CPU has no
    allocator statistics like ``torch.cuda.max_memory_allocated``; this is their
    counterpart."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return result, peak
