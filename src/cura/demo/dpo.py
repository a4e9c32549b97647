"""`cura train --demo dpo`: the bundled SmolLM2-135M-Instruct learns a house style from preference pairs.

DPO (the reference is the 4-bit base with the LoRA adapter off) on pairs `make_pairs.py` generates: a note
about a made-up person and a question; chosen `Answer: Lisbon.`, rejected the same fact in prose. It prints
the base model's and the tuned model's answers to held-out prompts (names and cities never seen in
training) side by side, with the held-out preference accuracy (how often log pi(chosen) > log pi(rejected))
and mean log-probability margin before and after, and how many answers are in the house style.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cura.demo import _clip, _merge, compute_dtype_name, say

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "style_pairs_train.jsonl"
EVAL_FILE = HERE / "style_pairs_eval.jsonl"
SHOWN = 4  # answers printed side by side
GENERATED = 8  # held-out prompts answered before and after (the preference metrics use every held-out pair)
HOUSE_PREFIX = "Answer:"

# Tuned by measurement on 2 cores (README, "The DPO demo"): the held-out preference accuracy leaves the base's
# level within ten steps; beta 0.1 as in the DPO paper.
DPO_DEMO: dict[str, Any] = {
    "objective": "dpo",
    "data": {"path": str(TRAIN_FILE), "eval_path": str(EVAL_FILE), "max_length": 128},
    "preference": {"beta": 0.1},
    "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0},
    "lr": 5e-4,
    "warmup_steps": 3,
    "max_steps": 20,
    "batch_size": 4,
    "save_every": 10,
    "eval_every": 0,
}


def dpo_demo_settings(user: dict[str, Any]) -> dict[str, Any]:
    """The DPO demo's config as plain data, with the user's keys on top."""
    settings = _merge(DPO_DEMO, user)
    settings.setdefault("output_dir", f"cura-runs/demo-dpo-{time.strftime('%Y%m%d-%H%M%S')}")
    return settings


def read_prompts(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    """(the held-out prompt as chat messages, its chosen answer) per row."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [([{"role": "user", "content": r["prompt"]}], r["chosen"]) for r in rows]


def house_style(answer: str) -> bool:
    """The answer is in the house format: `Answer: <fact>.` and nothing else on a second line."""
    text = answer.strip()
    return text.startswith(HOUSE_PREFIX) and "\n" not in text and len(text.split()) <= 6


def run_dpo_demo(config) -> int:
    """The DPO demo on `config` (from `dpo_demo_settings`); exit code 0 unless the held-out preference
    accuracy fell."""
    from cura.atomic import write_text
    from cura.generate import generate
    from cura.train import TrainHooks, train

    examples = read_prompts(Path(config.data.eval_path or EVAL_FILE))[:GENERATED]
    prompts = [messages for messages, _ in examples]
    before: list[str] = []

    def answers(model, tokenizer, what: str) -> list[str]:
        say(f"generating the {what} answers to {len(prompts)} held-out prompts...")
        return generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=8, progress=config.progress)

    def on_model_ready(model, tokenizer):
        before.extend(answers(model, tokenizer, "base model's"))  # LoRA's B starts at zero: the 4-bit base

    say(
        f"cura demo: DPO of {config.model} towards terse 'Answer: ...' replies ({config.max_steps} steps of "
        f"{config.batch_size} pairs, beta {config.preference.beta}, {compute_dtype_name(config.compute_dtype)} "
        f"compute; the reference is the 4-bit base with the adapter off; output in {config.output_dir})"
    )
    result = train(config, hooks=TrainHooks(on_model_ready=on_model_ready))
    if not result.get("completed"):
        return 0  # interrupted: train() said how to resume
    after = answers(result.model, result.tokenizer, "tuned model's")
    report = dpo_demo_report(examples, before, after, result)
    print(report)
    write_text(Path(config.output_dir) / "demo.md", report + "\n")
    acc_before = result.get("eval_preference_accuracy_before") or 0.0
    acc_after = result.get("eval_preference_accuracy_after") or 0.0
    return 0 if acc_after >= acc_before else 1


def dpo_demo_report(examples, before: list[str], after: list[str], summary: dict[str, Any]) -> str:
    """The side-by-side answers and the before/after table."""
    n = len(examples)
    chosen = [answer for _, answer in examples]
    lines = ["", "Held-out prompts (names and cities never seen in training):", ""]
    for (messages, answer), b, a in list(zip(examples, before, after))[:SHOWN]:
        lines.append(f"  prompt  {_clip(messages[-1]['content'], 100)}")
        lines.append(f"  base    {_clip(b, 100)}")
        lines.append(f"  DPO     {_clip(a, 100)}{'  ✓' if a.strip() == answer else '  ✗'}")
        lines.append("")

    def num(key: str, spec: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else format(value, spec)

    style = (sum(map(house_style, before)) / max(n, 1), sum(map(house_style, after)) / max(n, 1))
    exact = (
        sum(b.strip() == c for b, c in zip(before, chosen)) / max(n, 1),
        sum(a.strip() == c for a, c in zip(after, chosen)) / max(n, 1),
    )
    words = (
        sum(len(x.split()) for x in before) / max(n, 1),
        sum(len(x.split()) for x in after) / max(n, 1),
    )
    lines += [
        f"{'':36}{'base':>10}{'DPO':>10}",
        f"{'preference accuracy (held-out pairs)':36}{num('eval_preference_accuracy_before', '.0%'):>10}"
        f"{num('eval_preference_accuracy_after', '.0%'):>10}",
        f"{'mean log-prob margin chosen - rej.':36}{num('eval_logp_margin_before', '.2f'):>10}"
        f"{num('eval_logp_margin_after', '.2f'):>10}",
        f"{'answers in the house style':36}{style[0]:>10.0%}{style[1]:>10.0%}",
        f"{'  ... and exactly the right answer':36}{exact[0]:>10.0%}{exact[1]:>10.0%}",
        f"{'mean words per answer':36}{words[0]:>10.1f}{words[1]:>10.1f}",
        "",
        f"adapter saved in {summary.get('adapter_dir')}; try it: cura generate --adapter {summary.get('adapter_dir')} "
        '--prompt "Ana is a 40-year-old pilot who lives in Porto with a dog.\\nWhat is Ana\'s job?"',
    ]
    return "\n".join(lines)
