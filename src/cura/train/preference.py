"""Preference tuning in the loop: per-sequence log-probabilities, the reference, one optimizer step, eval.

    batch (2B rows: chosen then rejected, or B KTO rows + B mismatched `kl_*` rows)
      -> sequence_logps: decoder once, the output layer a chunk of scored tokens at a time (checkpointed),
         per-token log-probs summed per sequence with index_add (no (rows, T, vocab) logits tensor)
      -> reference: the same model inside `lora_disabled` under no_grad (or precomputed once per sample),
         run before the policy's forward so that its working memory is freed before the graph is built
      -> cura.train.objectives (DPO / IPO / rDPO, ORPO, KTO) -> per-example losses
      -> backward of their sum / the step's example count (ORPO's NLL: / the step's chosen answer tokens)

The step returns `cura.train.steps.optimizer_step`'s keys plus `metrics` (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, as TRL names them; KTO adds kl), which the log row carries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cura.adapters import lora_disabled
from cura.constants import IGNORE_INDEX
from cura.train.objectives import dpo_losses, kto_kl, kto_losses, orpo_odds_ratio
from cura.train.preference_config import PreferenceConfig
from cura.train.steps import clip_and_step, to_device

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def _chunk_token_logps(hidden, targets, head, softcap):
    logits = head(hidden).float()  # (N, V), N <= chunk_tokens
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int, prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's scored tokens (S,), float32; their count (S,)).

    `prefix` selects the rows (`"kl_"` for KTO's mismatched rows). Labels are aligned with input_ids: the
    prediction at position t scores labels[t + 1], as in `cura.train.steps.loss_sum`.
    """
    inputs = {k: batch[prefix + k] for k in MODEL_KEYS if prefix + k in batch}
    targets = batch[prefix + "labels"][:, 1:]  # (S, T-1)
    mask = targets != IGNORE_INDEX
    S = targets.shape[0]
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (S, T, H)
    rows = torch.arange(S, device=targets.device)[:, None].expand_as(targets)[mask]  # (N,)
    hidden, targets = hidden[:, :-1][mask], targets[mask]  # (N, H), (N,)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pieces = []
    for start in range(0, targets.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, h, t, head, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(h, t, head, softcap))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(S, dtype=torch.float32, device=targets.device).index_add(0, rows, token_logps)
    return sums + hidden.sum() * 0.0, mask.sum(dim=1)  # `* 0.0`: a graph even without scored tokens


@torch.no_grad()
def reference_logps(model, batch, chunk_tokens: int, prefix: str = "") -> torch.Tensor:
    """`sequence_logps` of the reference: the same model with every LoRA layer switched off."""
    with lora_disabled(model):
        return sequence_logps(model, batch, chunk_tokens, prefix)[0]


def _reference(model, batch, chunk_tokens, key="ref_logps", prefix=""):
    if key in batch:
        return batch[key].float()
    return reference_logps(model, batch, chunk_tokens, prefix)


def pair_losses(objective: str, cfg: PreferenceConfig, model, batch, chunk_tokens: int) -> dict:
    """DPO or ORPO on a pair batch: per-pair losses, rewards, and ORPO's summed NLL of the chosen answers."""
    ref = _reference(model, batch, chunk_tokens) if objective == "dpo" else None  # before the policy's graph
    logps, counts = sequence_logps(model, batch, chunk_tokens)
    B = logps.shape[0] // 2
    chosen, rejected = logps[:B], logps[B:]
    out = {"nll_sum": None}
    if objective == "orpo":
        losses, r_chosen, r_rejected = orpo_odds_ratio(
            chosen / counts[:B].clamp(min=1), rejected / counts[B:].clamp(min=1), beta=cfg.beta
        )
        out["nll_sum"] = -chosen.sum()
    else:
        losses, r_chosen, r_rejected = dpo_losses(
            chosen,
            rejected,
            ref[:B],
            ref[B:],
            beta=cfg.beta,
            loss_type=cfg.dpo_loss,
            label_smoothing=cfg.label_smoothing,
            chosen_tokens=counts[:B],
            rejected_tokens=counts[B:],
        )
    out.update(
        losses=losses, chosen_rewards=r_chosen, rejected_rewards=r_rejected, chosen=chosen, rejected=rejected
    )
    return out


def kto_batch_losses(cfg: PreferenceConfig, model, batch, chunk_tokens: int) -> dict:
    """KTO on a batch of labelled answers, its KL point from the batch's mismatched rows."""
    with torch.no_grad():
        kl_logps = sequence_logps(model, batch, chunk_tokens, "kl_")[0]
    ref_kl = _reference(model, batch, chunk_tokens, "ref_kl_logps", "kl_")
    kl = kto_kl(kl_logps, ref_kl)
    ref = _reference(model, batch, chunk_tokens)
    logps, _ = sequence_logps(model, batch, chunk_tokens)
    desirable = batch["kto_label"].bool()
    losses, rewards = kto_losses(
        logps,
        ref,
        desirable,
        kl,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
    )
    return {"losses": losses, "rewards": rewards, "desirable": desirable, "kl": kl, "nll_sum": None}


def micro_losses(objective: str, cfg: PreferenceConfig, model, batch, chunk_tokens: int) -> dict:
    if objective == "kto":
        return kto_batch_losses(cfg, model, batch, chunk_tokens)
    return pair_losses(objective, cfg, model, batch, chunk_tokens)


def n_examples(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a pair batch, answers in a KTO batch."""
    rows = batch["input_ids"].shape[0]
    return rows if "kto_label" in batch else rows // 2


def chosen_tokens(batch: dict[str, torch.Tensor]) -> int:
    B = n_examples(batch)
    return int((batch["labels"][:B, 1:] != IGNORE_INDEX).sum())


class RewardTally:
    """Sums over the micro-batches of a step (or the eval batches) -> the logged reward metrics."""

    def __init__(self) -> None:
        self.sums = {"chosen": 0.0, "rejected": 0.0, "margin": 0.0, "correct": 0.0, "kl": 0.0}
        self.counts = {"chosen": 0, "rejected": 0, "pairs": 0, "batches": 0}
        self.logp_margin, self.logp_correct = 0.0, 0.0

    def add(self, out: dict) -> None:
        self.counts["batches"] += 1
        if "rewards" in out:  # KTO
            r, d = out["rewards"].double(), out["desirable"]
            self.sums["chosen"] += float(r[d].sum())
            self.sums["rejected"] += float(r[~d].sum())
            self.counts["chosen"] += int(d.sum())
            self.counts["rejected"] += int((~d).sum())
            self.sums["kl"] += float(out["kl"])
            return
        c, r = out["chosen_rewards"].double(), out["rejected_rewards"].double()
        n = c.shape[0]
        self.sums["chosen"] += float(c.sum())
        self.sums["rejected"] += float(r.sum())
        self.sums["margin"] += float((c - r).sum())
        self.sums["correct"] += float((c > r).sum())
        self.counts["chosen"] += n
        self.counts["rejected"] += n
        self.counts["pairs"] += n
        gap = (out["chosen"] - out["rejected"]).detach().double()
        self.logp_margin += float(gap.sum())
        self.logp_correct += float((gap > 0).sum())

    def all_reduce(self, world) -> None:
        """Every rank's sums and counts summed (`world.sum`, float64), so the metrics are the global batch's."""
        keys = [("sums", k) for k in self.sums] + [("counts", k) for k in self.counts]
        values = [getattr(self, part)[k] for part, k in keys] + [self.logp_margin, self.logp_correct]
        reduced = world.sum(values)
        for (part, k), v in zip(keys, reduced):
            getattr(self, part)[k] = v if part == "sums" else int(v)
        self.logp_margin, self.logp_correct = reduced[-2], reduced[-1]

    def metrics(self) -> dict[str, float]:
        def mean(key, count):
            return self.sums[key] / self.counts[count] if self.counts[count] else None

        out = {"rewards/chosen": mean("chosen", "chosen"), "rewards/rejected": mean("rejected", "rejected")}
        if self.counts["pairs"]:
            out["rewards/margins"] = mean("margin", "pairs")
            out["rewards/accuracies"] = mean("correct", "pairs")
        elif out["rewards/chosen"] is not None and out["rewards/rejected"] is not None:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if self.counts["pairs"] == 0 and self.counts["batches"]:
            out["kl"] = self.sums["kl"] / self.counts["batches"]
        return out

    def preference(self) -> dict[str, float]:
        """The model's own preference on pairs: how often, and by how much, log pi(y_w) > log pi(y_l)."""
        n = self.counts["pairs"]
        if not n:
            return {}
        return {"preference_accuracy": self.logp_correct / n, "logp_margin": self.logp_margin / n}


def preference_step(
    model,
    micro_batches,
    optimizer,
    scheduler,
    params,
    *,
    objective: str,
    cfg: PreferenceConfig,
    chunk_tokens: int,
    max_grad_norm: float,
    device,
    world=None,
) -> dict:
    """`cura.train.steps.optimizer_step` for a preference objective (same keys, plus `metrics`).

    Under torchrun (`world`, DPO and ORPO) the step's pair count (and ORPO's chosen-token count) is summed
    over the ranks before the forward, each rank back-propagates its pairs' losses / that global count, and
    the gradients, losses and reward sums are summed over the ranks: the loss is the mean over the pairs of
    the global batch, as on one process reading it. A rank's empty share of an epoch's short last batch
    (every label ignored, `cura.train.distributed.ShardedBatches`) is skipped: it adds nothing."""
    micro_batches = [b for b in micro_batches if world is None or _has_scored_tokens(b)]
    total = sum(n_examples(b) for b in micro_batches)
    total_chosen_tokens = sum(chosen_tokens(b) for b in micro_batches) if objective == "orpo" else 0
    if world is not None:
        total, total_chosen_tokens = (int(x) for x in world.sum([total, total_chosen_tokens]))
    loss_total, tally = 0.0, RewardTally()
    for batch in micro_batches:
        out = micro_losses(objective, cfg, model, to_device(batch, device), chunk_tokens)
        loss = out["losses"].sum() / max(total, 1)
        if out["nll_sum"] is not None:
            loss = loss + out["nll_sum"] / max(total_chosen_tokens, 1)
        loss.backward()
        loss_total += float(loss.detach())
        tally.add(out)
    trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    inputs = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    if world is not None:
        loss_total, trained, inputs = world.sum([loss_total, trained, inputs])
        trained, inputs = int(trained), int(inputs)
        tally.all_reduce(world)
        world.all_reduce_grads(params)
    grad_norm, finite, lr = clip_and_step(optimizer, scheduler, params, max_grad_norm, loss_total)
    return {
        "loss": loss_total if finite else None,
        "raw_loss": loss_total,
        "grad_norm": grad_norm,
        "lr": lr,
        "finite": finite,
        "trained_tokens": trained,
        "input_tokens": inputs,
        "metrics": tally.metrics(),
    }


def _has_scored_tokens(batch: dict[str, torch.Tensor]) -> bool:
    return bool((batch["labels"][:, 1:] != IGNORE_INDEX).any())


@torch.no_grad()
def evaluate_preference(model, eval_batches, device, chunk_tokens: int, *, objective, cfg) -> dict | None:
    """Held-out preference loss (mean per example), reward metrics and the model's own pair preference."""
    if not eval_batches:
        return None
    was_training = model.training
    model.eval()
    tally, loss_sum, count, nll, tokens = RewardTally(), 0.0, 0, 0.0, 0
    for batch in eval_batches:
        batch = to_device(batch, device)
        out = micro_losses(objective, cfg, model, batch, chunk_tokens)
        loss_sum += float(out["losses"].sum())
        count += n_examples(batch)
        if out["nll_sum"] is not None:
            nll += float(out["nll_sum"])
            tokens += chosen_tokens(batch)
        tally.add(out)
    model.train(was_training)
    loss = loss_sum / max(count, 1) + (nll / max(tokens, 1) if objective == "orpo" else 0.0)
    return {"loss": loss, **tally.metrics(), **tally.preference()}


@torch.no_grad()
def precompute_reference(
    model, dataset, *, batch_size: int, max_length: int, pad_token_id, device, chunk_tokens
):
    """Store the reference log-probabilities in every sample of `dataset` (file order, fixed batches), so the
    steps skip the reference forward. Deterministic: a resumed run recomputes the same numbers."""
    from cura.data.preference import preference_batches

    for k, batch in enumerate(
        preference_batches(
            dataset,
            batch_size=batch_size,
            max_length=max_length,
            seed=0,
            epoch=0,
            pad_token_id=pad_token_id,
            shuffle=False,
        )
    ):
        batch = {key: v for key, v in batch.items() if not key.startswith("ref_")}
        batch = to_device(batch, device)
        samples = dataset.samples[k * batch_size : (k + 1) * batch_size]
        ref = reference_logps(model, batch, chunk_tokens).double().cpu().tolist()
        if "kto_label" in batch:
            ref_kl = reference_logps(model, batch, chunk_tokens, "kl_").double().cpu().tolist()
            for s, r, rk in zip(samples, ref, ref_kl):
                s["ref_logp"], s["ref_kl_logp"] = r, rk
        else:
            B = len(samples)
            for s, rc, rr in zip(samples, ref[:B], ref[B:]):
                s["ref_chosen_logp"], s["ref_rejected_logp"] = rc, rr
