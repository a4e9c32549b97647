"""The demo behind a bare `cura train`: the bundled SmolLM2-135M-Instruct learns a fixed JSON answer format.

It trains QLoRA adapters for a few minutes on 2 CPU cores on orders written in free text (`make_data.py`
generates them; names and cities of the held-out split never occur in training), then shows the base model's
and the fine-tuned model's answers to held-out prompts side by side, with the held-out loss and the task's
exact-match accuracy before and after.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "orders_train.jsonl"
EVAL_FILE = HERE / "orders_eval.jsonl"
SHOWN = 4  # answers printed side by side
SCORED = 32  # held-out prompts scored for exact match
ANSWERS_IN_STEPS = 10  # the held-out loss and the answers after training cost about this many steps

# The demo's settings; anything the user passes on the command line wins.
DEMO = {
    "data": {"path": str(TRAIN_FILE), "eval_path": str(EVAL_FILE), "max_length": 256, "packing": True},
    "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0},  # a 20-step run does not need dropout's regularisation
    "lr": 1e-3,
    "warmup_steps": 3,
    "max_steps": 30,
    "batch_size": 4,
    "save_every": 10,
    "eval_every": 0,
}
# Where compute is float32 (a CPU without AVX512-BF16/AMX, e.g. AVX2 only) a sample costs about 2.4x more: the
# demo trains on half-size batches to keep its few-minute promise. bench/results/demo.json, 2 cores (AMD EPYC,
# no checkpointing): bf16 batch 4 2.07 s/step, 117 s in all, exact match 0% -> 88%; AVX2 float32 batch 2
# 2.45 s/step, 160 s, 0% -> 78% (a Xeon with checkpointing: 4.3 and 5.2 s/step, 239 and 299 s).
DEMO_FLOAT32: dict[str, Any] = {"batch_size": 2}
MEASURED_MINUTES = {"bfloat16": 4, "float32": 5}  # the whole demo, first run, 2 cores (bench/demo.py)


def compute_dtype_name(compute_dtype: str) -> str:
    """The dtype a run will compute in ("bfloat16", "float32", ...): `auto` resolved as training resolves it
    (`cura.hardware.resolve_compute_dtype`); a name that is not a dtype is returned as given, for the config's
    validation to report."""
    from cura.constants import COMPUTE_DTYPES

    if compute_dtype not in COMPUTE_DTYPES:
        return compute_dtype
    from cura.hardware import default_device, resolve_compute_dtype

    return str(resolve_compute_dtype(compute_dtype, default_device())).removeprefix("torch.")


def float32_compute(compute_dtype: str) -> bool:
    """True when the run will compute in float32: asked for, or `auto` on hardware without native bf16."""
    return compute_dtype_name(compute_dtype) == "float32"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def demo_settings(user: dict[str, Any]) -> dict[str, Any]:
    """The demo's config as plain data, with the user's keys on top; lighter where compute is float32."""
    base = _merge(DEMO, DEMO_FLOAT32) if float32_compute(user.get("compute_dtype", "auto")) else DEMO
    settings = _merge(base, user)
    settings.setdefault("output_dir", f"cura-runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    return settings


def read_examples(path: Path, n: int) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, expected answer) for the first n rows."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            out.append((messages[:-1], messages[-1]["content"]))
            if len(out) == n:
                break
    return out


def exact_match(answer: str, expected: str) -> bool:
    """The answer parses as JSON and equals the expected object (key order and spacing do not matter)."""
    try:
        return json.loads(answer) == json.loads(expected)
    except (json.JSONDecodeError, TypeError):
        return False


def valid_json(answer: str) -> bool:
    try:
        json.loads(answer)
        return True
    except (json.JSONDecodeError, TypeError):
        return False


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(config, prompts_scored: int | None = None) -> int:
    """The demo on `config` (from `demo_settings`), scoring the first `prompts_scored` held-out prompts
    (default SCORED); exit code 0 unless the fine-tuned exact match fell below the base's."""
    from cura.atomic import write_text
    from cura.generate import generate
    from cura.train import TrainHooks, train

    examples = read_examples(Path(config.data.eval_path or EVAL_FILE), prompts_scored or SCORED)
    prompts = [messages for messages, _ in examples]
    before: list[str] = []

    def answers(model, tokenizer, what: str) -> list[str]:
        say(f"generating the {what} answers to {len(prompts)} held-out prompts...")
        return generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=8, progress=config.progress)

    def on_model_ready(model, tokenizer):
        before.extend(answers(model, tokenizer, "base model's"))  # LoRA's B starts at zero: the 4-bit base

    def on_step_end(step: int, row: dict[str, Any]) -> None:
        # step 1 also pays one-time costs (the CPU's matmul kernels are prepared for each new shape), so the
        # estimate is read off step 2; a one-step run has nothing left to estimate
        if step == 2 and row.get("seconds"):
            say(expected_duration(row["seconds"], config.max_steps - 2))

    dtype = compute_dtype_name(config.compute_dtype)
    say(
        f"cura demo: QLoRA fine-tune of {config.model} to answer orders in one JSON format "
        f"({config.max_steps} steps of {config.batch_size} x {config.data.max_length} tokens, {dtype} compute; "
        f"output in {config.output_dir})"
    )
    if config.max_steps == DEMO["max_steps"] and dtype in MEASURED_MINUTES:
        say(
            f"expected: about {MEASURED_MINUTES[dtype]} minutes with {dtype} compute on 2 cores (measured); the "
            "estimate for this machine follows after step 2"
        )
    result = train(config, hooks=TrainHooks(on_model_ready=on_model_ready, on_step_end=on_step_end))
    if not result.get("completed"):
        return 0  # interrupted: train() said how to resume
    after = answers(result.model, result.tokenizer, "fine-tuned model's")
    expected = [answer for _, answer in examples]
    report = demo_report(examples, before, after, result)
    print(report)
    write_text(Path(config.output_dir) / "demo.md", report + "\n")
    em_before = sum(map(exact_match, before, expected)) / len(expected)
    em_after = sum(map(exact_match, after, expected)) / len(expected)
    return 0 if em_after >= em_before else 1


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def expected_duration(step_seconds: float, steps_left: int) -> str:
    """What the rest of the demo should take, from one step's time: the steps are alike, and generating the
    fine-tuned model's answers costs about ANSWERS_IN_STEPS steps (measured on the bundled model)."""
    rest = step_seconds * (steps_left + ANSWERS_IN_STEPS)
    return (
        f"a step takes {step_seconds:.1f} s here: the demo should be done in about {_minutes(rest)} "
        f"({steps_left} more steps, then the fine-tuned model's answers)"
    )


def _minutes(seconds: float) -> str:
    seconds = max(1, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def demo_report(examples, before: list[str], after: list[str], summary: dict[str, Any]) -> str:
    expected = [answer for _, answer in examples]
    n = len(expected)
    em = (sum(map(exact_match, before, expected)) / n, sum(map(exact_match, after, expected)) / n)
    js = (sum(map(valid_json, before)) / n, sum(map(valid_json, after)) / n)
    lines = ["", "Held-out prompts (names and cities never seen in training):", ""]
    for (messages, answer), b, a in list(zip(examples, before, after))[:SHOWN]:
        lines.append(f"  prompt      {_clip(messages[-1]['content'].split(chr(10), 1)[-1], 100)}")
        lines.append(f"  base        {_clip(b, 100)}")
        lines.append(f"  fine-tuned  {_clip(a, 100)}{'  ✓' if exact_match(a, answer) else '  ✗'}")
        lines.append("")
    lb, la = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    lines += [
        f"{'':24}{'base':>10}{'fine-tuned':>12}",
        f"{'held-out loss':24}{lb:>10.3f}{la:>12.3f}" if lb is not None and la is not None else "",
        f"{'exact match (' + str(n) + ' prompts)':24}{em[0]:>10.0%}{em[1]:>12.0%}",
        f"{'valid JSON':24}{js[0]:>10.0%}{js[1]:>12.0%}",
        "",
        f"adapter saved in {summary.get('adapter_dir')}; try it: cura generate --adapter {summary.get('adapter_dir')} "
        '--prompt "Convert this order to JSON.\\nSend 3 lamps to Ana in Porto."',
    ]
    return "\n".join(line for line in lines if line is not None)
