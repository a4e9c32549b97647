"""What an export is checked on: chat probes with known answers, greedy answers, and how two models agree.

A probe is one conversation ending in an assistant turn, rendered with the chat template the model ships:
`ids` is the whole conversation, `start` the first answer token. Agreement is measured only on answer
positions (the tokens a user sees the model produce), as

    top1          share of answer positions where both models' most likely next token is the same
    mean_kl       mean KL(reference || other) of the next-token distributions, nats
    max_logprob   max |log p_ref(y) - log p_other(y)| over the answer's actual tokens y

rather than a raw bound on logits: a logit that moves by 1.0 where the model is sure of its token changes
nothing a user sees, while the same 1.0 at a near-tie flips an answer.

The prompts come from the run the model was trained in (`held_out_prompts`: its held-out file, as the demo
scores), else a few fixed conversations.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SAMPLE_CONVERSATIONS = (
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Write a haiku about autumn leaves."},
        {"role": "assistant", "content": "Red leaves drift and fall, quiet paths of gold and rust."},
    ],
    [
        {"role": "user", "content": "Add 17 and 25."},
        {"role": "assistant", "content": "17 + 25 = 42."},
        {"role": "user", "content": "And 42 + 8?"},
        {"role": "assistant", "content": "42 + 8 = 50."},
    ],
)
MAX_PROMPTS = 8  # held-out conversations an export is verified on (each costs a greedy answer per runtime)


@dataclass
class Probe:
    """A conversation's token ids and where its last answer starts."""

    ids: list[int]
    start: int


@dataclass
class Agreement:
    positions: int
    top1: float
    mean_kl: float
    max_logprob: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"top-1 agreement {self.top1:.1%} over {self.positions} answer positions, mean KL "
            f"{self.mean_kl:.2e}, max |log-prob diff| {self.max_logprob:.3g}"
        )


def render_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template (special tokens parsed)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def make_probes(tokenizer, conversations) -> list[Probe]:
    """Each conversation (ending in an assistant turn) as a `Probe`; the answer starts after the prompt
    rendered with the generation prompt (it must be a prefix of the whole, as in training's answer masks)."""
    probes = []
    for convo in conversations:
        full = render_ids(tokenizer, convo, False)
        prompt = render_ids(tokenizer, convo[:-1], True)
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            probes.append(Probe(full, len(prompt)))
    return probes


@torch.no_grad()
def answer_logits(model, probes: list[Probe]) -> list[torch.Tensor]:
    """Float32 next-token logits at each probe's answer positions: (len(answer), vocab) per probe."""
    out = []
    for probe in probes:
        logits = model(input_ids=torch.tensor([probe.ids])).logits[0].float()
        out.append(logits[probe.start - 1 : len(probe.ids) - 1])
    return out


def agreement(reference: list[torch.Tensor], other: list[torch.Tensor], probes: list[Probe]) -> Agreement:
    """`Agreement` of two models' answer logits (see the module docstring)."""
    same, kls, worst, n = 0, 0.0, 0.0, 0
    for ref, got, probe in zip(reference, other, probes):
        targets = torch.tensor(probe.ids[probe.start :])
        lp_ref, lp_got = ref.log_softmax(-1), got.log_softmax(-1)
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        kls += float((lp_ref.exp() * (lp_ref - lp_got)).sum(-1).clamp_min(0).sum())
        picked = (lp_ref.gather(-1, targets[:, None]) - lp_got.gather(-1, targets[:, None])).abs()
        worst = max(worst, float(picked.max()))
        n += len(targets)
    return Agreement(n, same / max(n, 1), kls / max(n, 1), worst)


def max_abs_diff(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference, other))


def perplexity(logprobs: list[float]) -> float:
    """exp(-mean log p) of the answer tokens."""
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))


def run_folder_of(model_source, adapter) -> Path | None:
    """The training run a model came from: the adapter's parent folder, or the run recorded by `cura merge`
    in a merged folder (`cura_merge.json`: adapter)."""
    if adapter is not None:
        return Path(adapter).resolve().parent
    record = Path(str(model_source)) / "cura_merge.json" if model_source is not None else None
    if record is not None and record.is_file():
        return Path(json.loads(record.read_text())["adapter"]).parent
    return None


def held_out_conversations(run: Path | None, limit: int = MAX_PROMPTS) -> tuple[list[list[dict]], str]:
    """(conversations, where they came from): the run's held-out file (`data.eval_path` of its config.json,
    rows with `messages`) when there is one, else `SAMPLE_CONVERSATIONS`."""
    config = run / "config.json" if run is not None else None
    if config is not None and config.is_file():
        path = (json.loads(config.read_text()).get("data") or {}).get("eval_path")
        if path and Path(path).is_file():
            rows = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    messages = json.loads(line).get("messages") if line.strip() else None
                    if messages and messages[-1].get("role") == "assistant":
                        rows.append(messages)
                    if len(rows) == limit:
                        break
            if rows:
                return rows, f"{path} (held out in {run.name})"
    return [list(c) for c in SAMPLE_CONVERSATIONS], "cura's sample conversations"


@torch.no_grad()
def greedy(model, prompt_ids: list[int], stop_ids: set[int], max_new_tokens: int) -> Greedy:
    """Greedy decoding with the KV cache (the stop token, when reached, is the last id)."""
    out = Greedy([], [], [], False)
    cache, step = None, torch.tensor([prompt_ids])
    for _ in range(max_new_tokens):
        result = model(input_ids=step, past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        lp = result.logits[0, -1].float().log_softmax(-1)
        top = lp.topk(2)
        token = int(top.indices[0])
        out.ids.append(token)
        out.logprobs.append(float(top.values[0]))
        out.gaps.append(float(top.values[0] - top.values[1]))
        if token in stop_ids:
            out.stopped = True
            break
        step = torch.tensor([[token]])
    return out


@dataclass
class Greedy:
    """A greedy answer: ids, log-prob of each, the gap to the runner-up at each step (a near-tie is where
    another runtime may pick the other token without anything being wrong), stopped at a stop token."""

    ids: list[int]
    logprobs: list[float]
    gaps: list[float]
    stopped: bool


@torch.no_grad()
def teacher_forced_logprobs(model, probes: list[Probe]) -> list[list[float]]:
    """log p(answer token | everything before it) for each probe's answer tokens."""
    out = []
    for probe, logits in zip(probes, answer_logits(model, probes)):
        lp = logits.log_softmax(-1)
        targets = torch.tensor(probe.ids[probe.start :])
        out.append(lp.gather(-1, targets[:, None])[:, 0].tolist())
    return out
