"""Reliability benchmark: run the hostile-input table (tests/hostile.py) and count, per category, the cases
tried and the cases that held (one sentence naming the file or key, exit 2, no traceback).

    PYTHONPATH=src python bench/reliability.py [--out bench/results/reliability.json] [--verbose] [--no-runs]

Part A's categories (run folder lock, resume changes, signals, kill -9, a full or read-only disk, ...) are
scenarios with real processes and real training runs, each a test of tests/test_run_safety.py /
tests/test_full_disk.py: they run through pytest's API and each test counts as one scenario of the category
RUN_SCENARIOS gives it (held = the test passed; a skip, e.g. no root to mount a small disk, counts as not
tried). `--no-runs` leaves them out (the input table alone takes seconds; the scenarios a few minutes).

Writes {"categories": {name: {"tried", "held"}}, "tried", "held", "cases": [...], "machine"} atomically.
More input categories join by adding cases to `tests/hostile.py`'s CASES, or by a module listed in
EXTRA_TABLES that exposes `CASES` in the same form.
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

EXTRA_TABLES: tuple[str, ...] = ()  # modules with more `CASES` in tests/hostile.py's form

# part A: test -> category; a test of these files missing here counts under "run safety (other)"
RUN_FILES = ("tests/test_run_safety.py", "tests/test_full_disk.py")
RUN_SCENARIOS = {
    "test_a_locked_folder_is_refused_and_a_stale_lock_taken_over": "run folder lock",
    "test_overwrite_clears_the_earlier_run_and_output_never_inside_data": "run folder lock",
    "test_resume_refuses_each_kind_of_change_and_allow_change_takes_effect": "resume changes",
    "test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one": "damaged checkpoints",
    "test_learning_rate_bounds_are_checked": "training guards",
    "test_weight_guard_and_stall_detection": "training guards",
    "test_a_poisoning_update_is_never_saved_and_the_advice_works": "training guards",
    "test_signals_in_each_phase": "signals",
    "test_cli_sigterm_while_loading_exits_130_with_nothing_written": "signals",
    "test_kill_9_during_re_saves_never_loses_the_folder": "kill -9",
    "test_kill_9_during_training_saves_then_resume_is_exact": "kill -9",
    "test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_continues": "full or read-only disk",
    "test_merge_and_gguf_export_to_a_full_disk_leave_nothing": "full or read-only disk",
    "test_a_read_only_output_is_refused_before_anything_loads": "full or read-only disk",
}


def all_cases() -> list:
    from hostile import CASES

    cases = list(CASES)
    for name in EXTRA_TABLES:
        cases.extend(importlib.import_module(name).CASES)
    return cases


class _Outcomes:
    """A pytest plugin keeping each test's outcome (the call phase decides; a failed setup is a failure)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        row = self.rows.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "message": ""})
        row["seconds"] += report.duration
        if report.skipped:
            row["outcome"] = "skipped"
            row["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        elif report.failed:
            row["outcome"] = "failed"
            row["message"] = report.longreprtext.strip().splitlines()[-1][:500] if report.longreprtext else ""


def run_scenarios() -> list[dict]:
    """Part A's scenarios: RUN_FILES through pytest in this process, one row per test."""
    import pytest

    outcomes = _Outcomes()
    files = [str(ROOT / f) for f in RUN_FILES]
    pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *files], plugins=[outcomes])
    rows = []
    for nodeid, row in outcomes.rows.items():
        name = nodeid.split("::")[-1]
        rows.append(
            {
                "category": RUN_SCENARIOS.get(name, "run safety (other)"),
                "case": name,
                "held": row["outcome"] == "passed",
                "tried": row["outcome"] != "skipped",
                "exit_code": None,
                "problems": [] if row["outcome"] != "failed" else [row["message"]],
                "message": row["message"],
                "seconds": round(row["seconds"], 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    parser.add_argument("--verbose", action="store_true", help="print every case's message")
    parser.add_argument("--no-runs", action="store_true", help="only the input table, not part A's scenarios")
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
    if not args.no_runs:
        for row in run_scenarios():
            tried[row["category"]] += row.pop("tried")
            held[row["category"]] += row["held"]
            rows.append(row)
            mark = "held " if row["held"] else "BROKE" if row["problems"] else "skip "
            print(f"{mark} {row['category']}: {row['case']}", flush=True)
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
