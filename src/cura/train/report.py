"""What a run leaves behind for people: metrics.jsonl, summary.json, the loss curve and the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cura.atomic import atomic_file, write_json, write_text


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged optimizer step, appended and flushed as it happens.

    On resume the lines after the checkpoint's step are dropped (they belong to steps that will be redone), so
    the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.read() if line.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a crash mid-write
                        continue
        return rows


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_json(path, summary)


def plot_losses(rows: list[dict[str, Any]], path: Path, *, held_out: list[tuple[int, float]] = ()) -> None:
    """Training loss per step (raw and smoothed) and the held-out loss (the logged `eval_loss` rows plus
    `held_out` points such as before and after training), on a log scale so that the late steps, where the
    loss is 100x smaller than at step 1, stay readable. Written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and r["loss"] > 0]
    evals = sorted(
        {s: v for s, v in [*held_out, *((r["step"], r.get("eval_loss")) for r in rows)] if v}.items()
    )
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train loss", color="#1f77b4", linewidth=0.8, alpha=0.45)
        ax.plot(steps, _ema(losses), label="train loss (smoothed)", color="#1f77b4", linewidth=1.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", color="#d62728")
    if train or evals:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on answer tokens (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:  # keeps the .png suffix savefig reads the format from
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def _ema(values, alpha: float = 0.3) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def log_row(step: int, epoch: int, result: dict, seconds: float, memory_bytes: int) -> dict[str, Any]:
    """The metrics.jsonl line of one optimizer step (`result` is `cura.train.steps.optimizer_step`'s)."""
    row = {
        "step": step,
        "epoch": epoch,
        "loss": result["loss"],
        "lr": result["lr"],
        "grad_norm": result["grad_norm"] if math.isfinite(result["grad_norm"]) else None,
        "trained_tokens": result["trained_tokens"],
        "tokens_per_second": result["input_tokens"] / seconds if seconds else None,
        "seconds": seconds,
        "memory_bytes": memory_bytes,
    }
    row.update(result.get("metrics", {}))  # preference objectives: rewards/chosen, rewards/margins, ...
    if not result["finite"]:
        row["skipped"] = True
    return row


def postfix(row: dict[str, Any]) -> str:
    """The progress bar's text after a step."""
    loss = "skipped" if row["loss"] is None else f"{row['loss']:.4f}"
    text = f"loss {loss} lr {row['lr']:.2e} {row['tokens_per_second'] or 0:.0f} tok/s mem {human_bytes(row['memory_bytes'])}"
    if row.get("rewards/accuracies") is not None:
        text += f" acc {row['rewards/accuracies']:.2f} margin {row['rewards/margins']:.3f}"
    elif row.get("rewards/margins") is not None:
        text += f" margin {row['rewards/margins']:.3f}"
    if row.get("eval_loss") is not None:
        text += f" eval {row['eval_loss']:.4f}"
    return text


def progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True
    )


def summary_text(s: dict[str, Any], out: Path) -> str:
    """What a run says when it ends: losses before and after, speed, memory, where its files are."""

    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        f"steps {s['steps']}/{s['total_steps']}; train loss {fmt(s['train_loss_first'])} -> {fmt(s['train_loss_last'])}; "
        f"held-out loss {fmt(s['eval_loss_before'])} -> {fmt(s['eval_loss_after'])}",
        f"{s['tokens_per_second'] or 0:.0f} tokens/s; peak memory {human_bytes(s['peak_memory_bytes'])}; "
        f"{s['wall_seconds']:.0f} s in all",
        f"adapter: {s['adapter_dir']}  metrics: {out / 'metrics.jsonl'}  plot: {out / 'loss.png'}",
    ]
    return "\n".join(lines)
