"""``subspace-optim memory``: what a train config needs, before any memory is spent.

The model is built on the meta device (shapes and dtypes, no storage) by the training
command's own builder, and so is the optimizer: it takes one real step on meta gradients,
so its state is exactly the tensors the optimizer would create (moments, bases, indices,
codes, scales), counted from those tensors: ``optimizer_states`` are the rule's entries,
``projectors`` the ``proj_*`` ones.

Activations follow a stated model, measured with saved-tensor hooks on transformers'
``LlamaForCausalLM`` (SDPA attention) over seven shapes (hidden, intermediate, heads,
layers, vocabulary and sequence length varied one at a time): per token, each decoder layer
saves ``10 h + 4 f + a`` elements (h hidden, f intermediate, a heads: the logsumexp of the
attention), and outside the layers ``3 h + V`` (V vocabulary: the log-softmax of the loss,
in fp32). With activation checkpointing each layer keeps only its input (``h``) and one
layer's activations exist again during its backward (counted as workspace, below).

Workspace is the largest transient: in backward the gradient of the logits (``V`` fp32
elements per token), in the step a refresh's SVD of the largest projected matrix (an fp32
copy of the gradient and the factors ``U``, ``Vh``) or an INT8 weight's fp32 copy.

The peak is where these meet: with ordinary steps, either the start of backward (all
activations and the logits' gradient), the optimizer step (every gradient and the step's
workspace) or, with activation checkpointing, the backward of the first layers (nearly
every gradient and a layer recomputed); in layer-wise mode gradients live one parameter
at a time and the step runs inside backward, so activations, one gradient and the step's
workspace coincide. Weights, optimizer states and projectors are held throughout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..memory import _tensor_bytes
from .config import RunConfig
from .model import build_model, build_optimizer

KEYS = ("weights", "gradients", "optimizer_states", "projectors", "activations", "workspace",
        "total")


@dataclass
class MemoryPlan:
    weights: int
    gradients: int
    optimizer_states: int
    projectors: int
    activations: int
    workspace: int
    total: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _dtype(cfg: RunConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp64": torch.float64}.get(cfg.training.dtype,
                                                               torch.float32)


def meta_model_and_optimizer(cfg: RunConfig, vocab_size: int):
    """The run's model and optimizer on the meta device, the optimizer after one step."""
    from ..nn.int8_linear import int8_layer_of

    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    model = model.to(_dtype(cfg))
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["skip_nonfinite"] = False  # a finiteness check reads values meta has not
        for p in group["params"]:
            layer = int8_layer_of(p)
            if layer is not None:
                layer.weight_grad = torch.empty(layer.out_features, layer.in_features,
                                                dtype=_dtype(cfg), device="meta")
            elif p.requires_grad:
                p.grad = torch.empty_like(p)
    optimizer.step()
    return model, optimizer


def _state_split(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(rule state bytes, projector state bytes)."""
    rule = projector = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key.startswith("proj_"):
                projector += _tensor_bytes(value)
            else:
                rule += _tensor_bytes(value)
    return rule, projector


def _gradient_bytes(optimizer: torch.optim.Optimizer) -> list[int]:
    """Bytes of each parameter's gradient (an INT8 weight's in the activations' dtype)."""
    from ..nn.int8_linear import int8_layer_of

    sizes = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = int8_layer_of(p)
            grad = layer.weight_grad if layer is not None else p.grad
            if grad is not None:
                sizes.append(_tensor_bytes(grad))
    return sizes


def _activation_model(cfg: RunConfig, vocab_size: int) -> tuple[int, int]:
    """Bytes per token: (held by one decoder layer, held outside the layers)."""
    mc = cfg.model_config
    h, f, a = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads
    e = torch.empty((), dtype=_dtype(cfg)).element_size()
    return (10 * h + 4 * f + a) * e, 3 * h * e + vocab_size * 4


def activation_bytes(cfg: RunConfig, vocab_size: int) -> int:
    """Saved activations of one micro-batch (see the module docstring)."""
    t, layers = cfg.training, cfg.model_config.num_hidden_layers
    tokens = t.batch_size * cfg.data.seq_len
    per_layer, outside = _activation_model(cfg, vocab_size)
    if t.activation_checkpointing:  # each layer's input; one layer again in its backward
        e = torch.empty((), dtype=_dtype(cfg)).element_size()
        return tokens * (layers * cfg.model_config.hidden_size * e + outside)
    return tokens * (layers * per_layer + outside)


def _backward_workspace(cfg: RunConfig, vocab_size: int) -> int:
    """The logits' gradient; with activation checkpointing also a layer's recomputed
    activations, which appear once the loss's own saved tensors are gone (measured: the
    peak is the larger of the two)."""
    tokens = cfg.training.batch_size * cfg.data.seq_len
    logits_grad = vocab_size * 4
    if cfg.training.activation_checkpointing:
        per_layer, outside = _activation_model(cfg, vocab_size)
        return tokens * max(logits_grad, per_layer - outside)
    return tokens * logits_grad


def _step_workspace(optimizer: torch.optim.Optimizer) -> int:
    """The step's largest transient: an SVD refresh of the largest projected matrix, or
    the fp32 copy of an INT8 weight."""
    from ..nn.int8_linear import int8_layer_of

    largest = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if int8_layer_of(p) is not None:
                largest = max(largest, p.numel() * 4)
            if "rank" in group and p.dim() >= 2 and group.get("projector") in ("galore",
                                                                              "q_galore"):
                m, n = p.shape[0], math.prod(p.shape[1:])
                k = min(m, n)
                largest = max(largest, (m * n + m * k + k * n) * 4)
    return largest


def plan(cfg: RunConfig, vocab_size: int | None = None) -> MemoryPlan:
    vocab = vocab_size or cfg.data.vocab_size
    model, optimizer = meta_model_and_optimizer(cfg, vocab)
    weights = sum(_tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))
    rule, projector = _state_split(optimizer)
    grads = _gradient_bytes(optimizer)
    activations = activation_bytes(cfg, vocab)
    backward_ws = _backward_workspace(cfg, vocab)
    step_ws = _step_workspace(optimizer)
    held = weights + rule + projector
    if cfg.training.layerwise:
        gradients = max(grads, default=0)
        total = held + activations + backward_ws + gradients + step_ws
    else:
        gradients = sum(grads)
        ends = [activations + backward_ws, gradients + step_ws]
        if cfg.training.activation_checkpointing:
            # The last layers' backward: nearly every gradient, and a layer recomputed.
            per_layer, _ = _activation_model(cfg, vocab)
            tokens = cfg.training.batch_size * cfg.data.seq_len
            ends.append(gradients + per_layer * tokens)
        total = held + max(ends)
    return MemoryPlan(weights, gradients, rule, projector, activations,
                      max(backward_ws, step_ws), total)


def fits(plan_: MemoryPlan, gpu_gib: float) -> bool:
    return plan_.total <= gpu_gib * 2**30


def measure(cfg: RunConfig, steps: int = 2) -> tuple[int, int]:
    """``(optimizer_state_bytes, peak bytes)`` of ``steps`` real steps of ``cfg`` on random
    tokens: the peak from the allocator (CUDA's statistics, or the CPU allocator's record
    through the profiler) plus the weights allocated before the steps."""
    from ..layerwise import step_in_backward
    from ..memory import optimizer_state_bytes, peak_cpu_bytes
    from .loop import token_losses

    device = torch.device("cuda" if cfg.training.device in ("auto", "cuda") and
                          torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(cfg, cfg.data.vocab_size).to(_dtype(cfg)).to(device)
    optimizer = build_optimizer(model, cfg)
    if cfg.training.layerwise:
        step_in_backward(optimizer)
    ids = torch.randint(0, cfg.data.vocab_size, (cfg.training.batch_size, cfg.data.seq_len + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def run() -> None:
        for _ in range(steps):
            loss, n = token_losses(model, ids)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        before = sum(_tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))
        _, extra = peak_cpu_bytes(run)
        peak = before + extra
    return optimizer_state_bytes(optimizer), peak
