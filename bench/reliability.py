"""Reliability benchmark: run the hostile-input table (tests/hostile.py) and count, per category, the cases
tried and the cases that held (one sentence naming the file or key, exit 2, no traceback).

    PYTHONPATH=src python bench/reliability.py [--out bench/results/reliability.json] [--verbose]

Writes {"categories": {name: {"tried", "held"}}, "tried", "held", "cases": [...], "machine"} atomically.
More categories (run folders, signals, kill -9) join by adding cases to `tests/hostile.py`'s CASES, or by a
module listed in EXTRA_TABLES that exposes `CASES` in the same form.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

EXTRA_TABLES: tuple[str, ...] = ()  # e.g. "hostile_runs" (part A's run-folder cases), when they exist


def all_cases() -> list:
    from hostile import CASES

    cases = list(CASES)
    for name in EXTRA_TABLES:
        cases.extend(importlib.import_module(name).CASES)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    parser.add_argument("--verbose", action="store_true", help="print every case's message")
    args = parser.parse_args(argv)

    from cura.atomic import write_json
    from cura.hardware import describe_machine
    from hostile import build_env, run_case

    tried, held, rows = Counter(), Counter(), []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cura-reliability-") as scratch:
        scratch = Path(scratch)
        env = build_env(scratch / "env")
        for i, case in enumerate(all_cases()):
            outcome = run_case(case, scratch / f"case-{i}", env)
            tried[case.category] += 1
            held[case.category] += outcome.held
            rows.append(
                {
                    "category": case.category,
                    "case": case.name,
                    "held": outcome.held,
                    "exit_code": outcome.code,
                    "problems": outcome.problems(),
                    "message": (outcome.error or outcome.message.strip()[-500:]).replace(f"{scratch}/", ""),
                    "seconds": round(outcome.seconds, 3),
                }
            )
            mark = "held " if outcome.held else "BROKE"
            print(f"{mark} {case.category}: {case.name}", flush=True)
            if args.verbose or not outcome.held:
                print(f"      {rows[-1]['message']}", flush=True)
    result = {
        "categories": {c: {"tried": tried[c], "held": held[c]} for c in tried},
        "tried": sum(tried.values()),
        "held": sum(held.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "cases": rows,
        "machine": describe_machine(),
    }
    write_json(args.out, result)
    print(f"{result['held']} of {result['tried']} held; written to {args.out}")
    return 0 if result["held"] == result["tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
