"""One named optimizer per projector, all with the AdamW inner rule.

Each class is ``SubspaceAdamW`` (or ``GaLoreAdamW`` where the method's reference code
builds on galore-torch's AdamW) with a different default projector; the projector's own
defaults (gap, scale, options) come from its ``group_defaults``.
"""

from __future__ import annotations

from .adamw import GaLoreAdamW, SubspaceAdamW


class DCTAdamW(SubspaceAdamW):
    """AdamW in a subspace of shared DCT-II columns chosen by gradient energy (projector
    ``dct``: gap 1, no scale). The reference's update is torch AdamW's arithmetic (bias
    correction folded into the step, eps scaled by sqrt(1 - beta2^t)), so are the defaults."""

    default_projector = "dct"


class OnlineSubspaceAdamW(GaLoreAdamW):
    """Online Subspace Descent with AdamW (projector ``online_pca``). The reference code is a
    fork of galore-torch and keeps its AdamW, so this keeps ``GaLoreAdamW``'s defaults."""

    default_projector = "online_pca"


class FloraAdamW(SubspaceAdamW):
    """AdamW whose moments live in Flora's seeded random subspace, resampled every
    ``update_proj_gap`` = 1000 steps with the moments carried over (projector ``flora``).
    Flora's own algorithm (Adafactor, only the momentum compressed) is ``FloraAdafactor``."""

    default_projector = "flora"


class GrassAdamW(SubspaceAdamW):
    """AdamW on Grass's selected gradient rows (projector ``grass``); moments reset at each
    refresh. No reference code exists, so the defaults are torch AdamW's and GaLore's."""

    default_projector = "grass"


class QGaLoreAdamW(SubspaceAdamW):
    """GaLore with an INT4 basis and layer-adaptive lazy refresh (projector ``q_galore``).
    Defaults are those of the reference's optimizer class (bitsandbytes AdamW: lr 1e-3,
    betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2); the 8-bit-state variant with the
    scripts' beta2 = 0.95 is ``QGaLoreAdamW8bit``. The reference applies weight decay after
    the projected update; here it comes before (torch's order), a difference of order
    ``lr^2 * weight_decay`` per step."""

    default_projector = "q_galore"
