"""The functional API: each inner rule as one function over lists of tensors, with three
bodies of one signature (torch.optim's pattern):

* ``"reference"``: a loop over the tensors, one parameter at a time; readable, and the
  definition of correct (bit for bit the library's original per-tensor code);
* ``"foreach"``: ``torch._foreach_*`` over the bucket's moments (or torch's multi-tensor
  fused AdamW kernel), then one GEMM per projected matrix that back-projects the update
  into the weight with the decoupled weight decay folded into it; the default;
* ``"fused"``: the op seam's kernels (``subspace_optim.ops``), one per parameter.

Each function updates the moments and the weights in place. ``grads`` are the gradients in
the subspace (projected), or full gradients where ``bases[i]`` is ``None``; ``bases`` are
the projector's transient bases and ``projector`` applies them; ``state_steps`` count the
updates including this one (1-based).
"""

from .adafactor import subspace_adafactor
from .adamw import subspace_adamw
from .lion import subspace_lion

IMPLEMENTATIONS = ("reference", "foreach", "fused")

__all__ = ["IMPLEMENTATIONS", "subspace_adafactor", "subspace_adamw", "subspace_lion"]
