"""`PreferenceConfig`: the settings of the preference objectives (DPO, IPO, ORPO, KTO), torch-free.

The objective itself is `TrainConfig.objective` (`--objective dpo`); these are the `preference.*` keys. The
formulas they enter are in `cura.train.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cura.errors import CuraError

OBJECTIVES = ("sft", "dpo", "orpo", "kto")
PAIRED = ("dpo", "orpo")  # chosen/rejected pairs; kto reads unpaired rows with a label
WITH_REFERENCE = ("dpo", "kto")  # need log-probabilities of the reference (the base, adapter off)
DpoLoss = Literal["sigmoid", "ipo", "robust"]


@dataclass
class PreferenceConfig:
    """How the preference objectives score a pair (or, for KTO, one labelled answer)."""

    beta: float = 0.1
    """DPO/KTO: strength of the tie to the reference (reward = beta * log-ratio); IPO: tau; ORPO: lambda"""
    dpo_loss: DpoLoss = "sigmoid"
    """DPO variant: sigmoid (DPO; cDPO with label_smoothing), ipo (IPO), robust (rDPO)"""
    label_smoothing: float = 0.0
    """DPO: the assumed probability that a pair's labels are flipped (cDPO / rDPO), from 0 to below 0.5"""
    desirable_weight: float = 1.0
    """KTO: weight of the losses of desirable (label true) answers"""
    undesirable_weight: float = 1.0
    """KTO: weight of the losses of undesirable (label false) answers"""
    precompute_reference: bool = False
    """DPO/KTO: compute the reference log-probabilities once over the data before training (saves a forward per step)"""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise CuraError(f"config key 'preference.beta' must be positive (e.g. 0.1), got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise CuraError(
                f"config key 'preference.label_smoothing' must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.dpo_loss == "ipo" and self.label_smoothing:
            raise CuraError(
                "config key 'preference.label_smoothing' has no meaning for preference.dpo_loss ipo; set it to 0 "
                "or use dpo_loss sigmoid (cDPO) or robust (rDPO)"
            )
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise CuraError(f"config key 'preference.{key}' must be positive, got {getattr(self, key)}")
