"""The demo (`cura train` with no arguments) timed as a new user runs it, on each kind of CPU this machine
can stand in for, with its before/after scores.

    python bench/demo.py [--kinds native,avx2] [--fresh-cache]     -> bench/results/demo.json
    git worktree add /tmp/cura-before ed7e197 && python bench/demo.py --fresh-cache --before /tmp/cura-before

Kinds:
- ``native``: the machine as it is (`compute_dtype auto`: bfloat16 where AVX512-BF16/AMX exists);
- ``float32``: a CPU with AVX-512 but without native bf16: float32 compute;
- ``avx2``: an AVX2-only laptop, emulated: float32 compute with PyTorch's, oneDNN's and MKL's kernels capped
  at AVX2 (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`, `MKL_ENABLE_INSTRUCTIONS=AVX2`). cura's own
  dequantization kernels still use what the CPU has (a small part of a step), so a real AVX2 CPU may be a
  little slower.
Kinds run now replace the same kinds in the results file; the others are kept.
Each run is a subprocess with its own output folder; `--fresh-cache` also converts the bundled GGUF again, as
on a new machine. The machine is shared: the load average is recorded beside each time.

`--before DIR` also runs the demo of another checkout of cura (its `src` first on PYTHONPATH), interleaved
with this one per kind (before, after), and records it under "before" with the after/before ratios of step
time and training time: how much faster the demo got on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cura.atomic import write_json
from cura.hardware import describe_machine

RESULTS = Path(__file__).parent / "results" / "demo.json"
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
KINDS = {
    "native": ({}, []),
    "float32": ({}, ["--compute-dtype", "float32"]),  # an AVX-512 CPU without bf16
    "avx2": (AVX2_ONLY, ["--compute-dtype", "float32"]),
}


def run_kind(kind: str, fresh_cache: bool, source: Path | None = None) -> dict:
    env_extra, flags = KINDS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **env_extra}
        if source is not None:  # that checkout's cura, not this one's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source / "src"), env.get("PYTHONPATH")]))
        if fresh_cache:
            env["CURA_CACHE"] = str(Path(tmp) / "cache")
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "cura", "train", "--output", str(out), "--progress", "false", *flags]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{kind}: the demo exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        table = (out / "demo.md").read_text()
        batch_size = json.loads((out / "config.json").read_text())["batch_size"]
    return {
        "env": env_extra,
        "flags": flags,
        "wall_seconds": round(wall, 1),
        "train_wall_seconds": round(summary["wall_seconds"], 1),
        "seconds_per_step": round(summary["seconds_per_step"], 2),
        "steps": summary["steps"],
        "batch_size": batch_size,
        "compute_dtype": summary["compute_dtype"],
        "eval_loss": [summary["eval_loss_before"], summary["eval_loss_after"]],
        "exact_match": _row(table, "exact match"),
        "valid_json": _row(table, "valid JSON"),
        "expected_duration_line": next(
            (ln for ln in proc.stderr.splitlines() if "should be done" in ln), None
        ),
        "load_average_1min_at_start": load,
    }


def _row(table: str, label: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(label))
    return re.findall(r"\d+%", line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="native,avx2")
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument("--before", type=Path, default=None, help="another cura checkout to compare with")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results, before = {}, {}
    for kind in kinds:
        if args.before is not None:
            before[kind] = run_kind(kind, args.fresh_cache, args.before.resolve())
        results[kind] = run_kind(kind, args.fresh_cache)
    for label, rows in (("before ", before), ("", results)):
        for kind, r in rows.items():
            print(
                f"{label}{kind}: {r['wall_seconds']:.0f} s, {r['seconds_per_step']} s/step, "
                f"exact match {r['exact_match']}"
            )
    for r in [*results.values(), *before.values()]:
        r["fresh_cache"] = args.fresh_cache
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    kept = {k: v for k, v in previous.get("kinds", {}).items() if k in KINDS and k not in results}
    out = {"benchmark": "demo", "machine": describe_machine(), "kinds": {**kept, **results}}
    if before:
        out["before"] = {
            "checkout": _describe_checkout(args.before),
            "kinds": before,
            "after_over_before": {
                kind: {
                    "seconds_per_step": results[kind]["seconds_per_step"] / b["seconds_per_step"],
                    "train_wall_seconds": results[kind]["train_wall_seconds"] / b["train_wall_seconds"],
                    "same_batch_size": results[kind]["batch_size"] == b["batch_size"],
                }
                for kind, b in before.items()
            },
        }
    elif "before" in previous and previous.get("machine") == out["machine"]:
        out["before"] = previous["before"]  # measured on this machine: still a comparison
    write_json(RESULTS, out)


def _describe_checkout(folder: Path) -> str:
    """The commit of a checkout (its short hash and subject), or its path when git cannot tell."""
    proc = subprocess.run(
        ["git", "-C", str(folder), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return proc.stdout.strip() or str(folder)


if __name__ == "__main__":
    main()
