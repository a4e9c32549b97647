"""cura's learning-rate schedules against transformers' `get_*_schedule_with_warmup`.

After warmup cura's linear and cosine factors are transformers' exactly. During warmup cura's step s
(0-based) uses (s + 1) / warmup, which is transformers' factor at s + 1: transformers' first optimizer
step runs at learning rate 0 (factor 0 / warmup), so it changes nothing but the optimizer's moments;
cura's first step already learns (cura reaches factor 1 at s = warmup - 1, transformers at s = warmup;
from s = warmup on the two are the same function).

Past the last step (never taken) transformers' cosine rises again (cos of a progress above 1) while
cura's stays at 0; only the steps of the run are compared.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from cura.train.steps import lr_lambda

REFERENCE = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
}


def _transformers_factors(name: str, warmup: int, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if name == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        scheduler = REFERENCE[name](optimizer, warmup, total)
    factors = []
    for _ in range(total):  # the steps a run of `total` optimizer steps takes
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 20), (5, 5), (1, 7), (4, 101)])
def test_schedules_match_transformers_after_warmup_and_shift_by_one_during_it(name, warmup, total):
    ours = lr_lambda(name, warmup, total)
    theirs = _transformers_factors(name, warmup, total)
    for step in range(total):
        if step < warmup:
            assert ours(step) == pytest.approx((step + 1) / warmup, rel=1e-12), step
            assert theirs[step] == pytest.approx(step / warmup, rel=1e-12), step
        else:
            assert ours(step) == pytest.approx(theirs[step], rel=1e-9, abs=1e-12), step


def test_first_step_learns_in_cura_but_not_in_transformers():
    assert lr_lambda("cosine", 4, 10)(0) == 0.25
    assert _transformers_factors("cosine", 4, 10)[0] == 0.0
