"""A good checkpoint is good: the trained weights are checked after every update, and a run whose loss never
moves is reported.

The non-finite check in `optimizer_step` looks at the loss and gradients of a step, which are computed
from the weights *before* its update: an update with an absurd learning rate turns finite weights into
inf/NaN (or 1e30) while its own loss looked fine. `weights_problem` looks at the weights after the update,
so a checkpoint (and the adapter) is never written from them, and the run stops with advice that works as
printed (resume from the last good checkpoint with a smaller --lr, which `--allow-change lr` lets through).
"""

from __future__ import annotations

import math

import torch

HUGE = 1e8
"""Largest |LoRA weight| still taken as trained: they start below 1 and an AdamW step moves each by about
lr (at most 1, see `TrainConfig.lr`), so 1e8 means the update blew up, and products of such weights overflow
half precision."""


@torch.no_grad()
def weights_problem(params) -> str | None:
    """None when every trainable weight is finite and below `HUGE`, else what is wrong with them.

    One pass and one device sync: the max of |w| per tensor is NaN or inf when any entry is. Parameters
    sharded across processes (DTensors, `--fsdp`) are judged on every rank's shards together
    (`_sharded_worst`), so all ranks stop, or none."""
    params = list(params)
    if any(hasattr(p, "to_local") for p in params):
        worst = _sharded_worst(params)
    else:
        maxima = [p.detach().abs().max().float() for p in params if p.numel()]
        if not maxima:
            return None
        worst = float(torch.stack([m.to(maxima[0].device) for m in maxima]).max())
    if not math.isfinite(worst):
        return "non-finite (inf or NaN) LoRA weights"
    if worst > HUGE:
        return f"LoRA weights as large as {worst:.3g}"
    return None


def _sharded_worst(params) -> float | None:
    """The largest |w| over every rank's shards (inf when any is not finite), in one all-reduce: a DTensor's
    own `max()` is a Partial placement whose `float()` reads only this rank's shard, so ranks would disagree
    (and the one that stops would leave the others waiting in their next collective)."""
    import torch.distributed as dist

    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    local = [t.detach() for t in local if t.numel()]
    device = local[0].device if local else torch.device("cpu")
    maxima = torch.stack([t.abs().max().float() for t in local]) if local else torch.zeros(1, device=device)
    finite = torch.isfinite(maxima)
    both = torch.stack([(~finite).any().float(), torch.where(finite, maxima, 0.0).max()])
    comm = both if device.type == "cuda" else both.cpu()
    try:
        dist.all_reduce(comm, op=dist.ReduceOp.MAX)
    except (RuntimeError, dist.DistError) as exc:
        from cura.train.distributed import lost_contact

        raise lost_contact(dist.get_rank(), dist.get_world_size(), "checking the LoRA weights", exc) from None
    bad, worst = comm.tolist()
    return math.inf if bad else worst


def lower_lr_advice(lr: float, last_good) -> str:
    """What to run next: resume from the last good checkpoint with a tenth of the learning rate."""
    if last_good is None:
        return f"start again with a lower learning rate, e.g. --lr {lr / 10:.3g} (with --overwrite)"
    return (
        f"the last good checkpoint is {last_good}: continue from it with a lower learning rate, e.g. "
        f"--resume --allow-change lr --lr {lr / 10:.3g}, or check the data"
    )


def stalled(losses: list[float], *, min_steps: int = 5) -> bool:
    """Whether at least `min_steps` logged training losses are all the same (to 1e-6 of their size): the
    updates do not move the model, which an absurd learning rate (weights saturated) or a frozen model gives."""
    if len(losses) < min_steps or not all(math.isfinite(x) for x in losses):
        return False
    return max(losses) - min(losses) <= 1e-6 * max(1.0, abs(losses[0]))
