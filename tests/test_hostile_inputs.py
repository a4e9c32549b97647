"""Hostile inputs (tests/hostile.py): each gives one sentence naming the file or key, exit 2, no traceback.

Plus the pieces around them: the top-level handler (a bug -> a saved crash report and one line; Ctrl-C ->
130), stale GGUF conversions cleaned, a long CSV field read rather than refused, and cura's table of ggml
block sizes against the gguf package's.
"""

from __future__ import annotations

import pytest

from hostile import CASES, build_env, run_case


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("hostile-env"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}: {c.name}" for c in CASES])
def test_hostile_input_is_one_sentence(case, env, tmp_path):
    outcome = run_case(case, tmp_path, env)
    assert outcome.held, f"{case.name}: {', '.join(outcome.problems())}\n{outcome.message[-3000:]}"
