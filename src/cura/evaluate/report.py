"""Reports of an evaluation: eval.json, a Markdown before/after table with examples, a PNG bar chart.

Every file is written atomically (`cura.atomic`): a temporary beside it, renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from cura.atomic import atomic_file, write_json, write_text
from cura.evaluate.outputs import COMPARISON_FILES, REPORT_MARK, RESULT_FILES, check_report_folder
from cura.evaluate.run import Comparison, EvalResult

# metrics where lower is better (the delta column marks improvements either way)
LOWER_IS_BETTER = ("loss", "perplexity")


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _cell(text: str, width: int = 300) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def result_markdown(result: EvalResult) -> str:
    """A one-model table of metrics."""
    lines = [f"| metric | {result.label} |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in result.metrics.items()]
    return "\n".join(lines)


def comparison_markdown(comparison: Comparison, *, examples: int = 3) -> str:
    """The before/after table per metric with deltas, then a few generations side by side."""
    before, after = comparison.before, comparison.after
    lines = [
        "# cura evaluation: comparison",
        "",
        f"{before.n_samples} samples; ROUGE, BLEU, chrF and exact match are 0-100 (higher is better); "
        "loss and perplexity are over the answer tokens (lower is better).",
        "",
        f"| metric | {before.label} | {after.label} | delta |",
        "|---|---:|---:|---:|",
    ]
    for name, delta in comparison.deltas().items():
        better = delta < 0 if name in LOWER_IS_BETTER else delta > 0
        mark = " (better)" if better and delta != 0 else ""
        lines.append(
            f"| {name} | {_fmt(before.metrics[name])} | {_fmt(after.metrics[name])} | {delta:+.4f}{mark} |"
        )
    pairs = list(zip(before.samples, after.samples, strict=False))[:examples]
    if pairs:
        lines += ["", "## Example generations", ""]
        for i, (a, b) in enumerate(pairs, 1):
            lines += [
                f"### Example {i}",
                "",
                "| | text |",
                "|---|---|",
                f"| prompt | {_cell(a['prompt'])} |",
                f"| reference | {_cell(a['references'][0])} |",
                f"| {before.label} | {_cell(a['prediction'])} |",
                f"| {after.label} | {_cell(b['prediction'])} |",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def comparison_chart(comparison: Comparison, path: Path) -> Path:
    """A bar chart (one panel per metric, since their scales differ) of before vs after, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(comparison.deltas())
    fig, axes = plt.subplots(
        1, max(len(names), 1), figsize=(2.2 * max(len(names), 1) + 1, 3.2), squeeze=False
    )
    labels = [comparison.before.label, comparison.after.label]
    for ax, name in zip(axes[0], names, strict=False):
        values = [comparison.before.metrics[name], comparison.after.metrics[name]]
        ax.bar([0, 1], values, color=["#9aa5b1", "#2f6fb0"])
        ax.set_xticks([0, 1], ["before", "after"])
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{labels[0]} (before) vs {labels[1]} (after)", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def write_comparison(
    comparison: Comparison, folder: str | Path, *, extra: dict | None = None
) -> dict[str, Path]:
    """report.md, eval.json and compare.png in `folder` (created if needed; never over a user's files)."""
    folder = Path(folder)
    check_report_folder(folder, COMPARISON_FILES)
    data = {"written_by": REPORT_MARK, **comparison.to_dict(), **(extra or {})}
    return {
        "report": write_text(folder / "report.md", comparison_markdown(comparison)),
        "json": write_json(folder / "eval.json", data),
        "chart": comparison_chart(comparison, folder / "compare.png"),
    }


def write_result(result: EvalResult, folder: str | Path, *, extra: dict | None = None) -> dict[str, Path]:
    """eval.json and report.md for one model in `folder` (never over a user's files)."""
    folder = Path(folder)
    check_report_folder(folder, RESULT_FILES)
    return {
        "json": write_json(
            folder / "eval.json", {"written_by": REPORT_MARK, **result.to_dict(), **(extra or {})}
        ),
        "report": write_text(folder / "report.md", "# cura evaluation\n\n" + result_markdown(result) + "\n"),
    }
