"""The preference losses as pure functions of per-sequence log-probabilities (no model, no data).

Notation: for a prompt x and an answer y, `log pi(y|x)` is the policy's log-probability of the answer
tokens summed over the answer (the scored tokens, as in SFT); `log ref(y|x)` is the same under the
reference, which for LoRA is the base with the adapter switched off. y_w is the chosen answer, y_l the
rejected one; `h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))`.

DPO, Rafailov et al. 2023 (arXiv 2305.18290), with label smoothing eps (cDPO, Mitchell 2023):
    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
rDPO, Chowdhury et al. 2024 (arXiv 2403.00409), TRL's "robust":
    loss = (-(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h)) / (1 - 2 eps)
IPO, Azar et al. 2023 (arXiv 2310.12036), eq. 17 with tau = beta, on per-token means (as TRL, confirmed
with the IPO authors):
    loss = (h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2,   h_w = log pi(y_w|x) - log ref(y_w|x), ...
ORPO, Hong et al. 2024 (arXiv 2403.07691), eqs. 4-7, lambda = beta, with P the per-token mean probability:
    log odds(y) = log P(y|x) - log(1 - P(y|x)),   log P = (1/|y|) sum log pi
    loss = NLL(y_w) - lambda * log sigmoid(log odds(y_w) - log odds(y_l))
KTO, Ethayarajh et al. 2024 (arXiv 2402.01306), eq. 7, with r = log pi(y|x) - log ref(y|x) and the KL
reference point z0 = max(0, mean over the batch of (log pi(y'|x) - log ref(y'|x))) on mismatched pairs
(x with another row's answer y'), computed without gradient:
    desirable:   loss = w_d * (1 - sigmoid(beta * (r - z0)))
    undesirable: loss = w_u * (1 - sigmoid(beta * (z0 - r)))

Rewards (logged as TRL names them): `beta * (log pi - log ref)` for DPO and KTO, `beta * log P` for ORPO.
Each function returns per-example losses; the caller averages them over the examples of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def dpo_losses(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) of DPO, cDPO, rDPO ("robust") or IPO."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("IPO needs the answer lengths (chosen_tokens, rejected_tokens)")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(
    chosen_mean: Tensor, rejected_mean: Tensor, *, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair odds-ratio losses `-lambda * log sigmoid(log OR)`, chosen rewards, rejected rewards) from the
    per-token mean log-probabilities of the answers (the NLL term is added by the caller)."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_losses(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(per-example losses, rewards) of KTO; `desirable` is a bool tensor, `kl` the (detached) z0."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: the batch mean of the mismatched log-ratios, clamped at 0, without gradient."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
