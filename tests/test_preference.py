"""Preference tuning: losses and gradients against TRL 1.16, the adapter-free reference, data shapes and
errors, and exact resume for every objective (tiny random models, the tiny ChatML tokenizer)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cura.adapters import LoraConfig, attach_lora, lora_disabled, lora_layers
from cura.data import DataConfig
from cura.data.preference import (
    assign_kl_partners,
    build_preference_datasets,
    encode_preference_row,
    preference_batch,
    read_preference_rows,
)
from cura.data.template import effective_chat_template
from cura.errors import CuraError
from cura.train import TrainConfig, TrainHooks, train
from cura.train.checkpoint import latest_checkpoint
from cura.train.preference import kto_batch_losses, pair_losses, reference_logps, sequence_logps
from cura.train.preference_config import PreferenceConfig

PAIRS = [
    ("What is two plus two?", "Four.", "Let me think about it for a while: it might be five, or maybe six."),
    ("Name a colour.", "Blue.", "There are so many colours that I could not possibly pick only one."),
    ("Capital of France?", "Paris.", "The capital of France is a city, which I believe is Lyon."),
    ("Is ice cold?", "Yes.", "That depends on many things, such as who you ask and when."),
]


def pair_rows() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r, "source": f"pairs:{i + 1}"}
        for i, (p, c, r) in enumerate(PAIRS)
    ]


@pytest.fixture(scope="module")
def tiny(chat_tokenizer):
    """(base, policy with a random non-zero adapter, separately built reference, tokenizer), float32."""
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    config = tiny_config("llama")
    config.vocab_size = len(chat_tokenizer)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    reference, policy = copy.deepcopy(base), copy.deepcopy(base)
    attach_lora(policy, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    torch.manual_seed(1)
    for layer in lora_layers(policy).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    policy.train()
    return policy, reference, chat_tokenizer


def pair_batch(tokenizer, rows=None):
    template, _ = effective_chat_template(tokenizer)
    rows = rows or pair_rows()
    samples = [encode_preference_row(tokenizer, template, r, DataConfig(max_length=128))[0] for r in rows]
    return preference_batch(samples, list(range(len(samples))), 128, tokenizer.pad_token_id)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:  # float32 sums in another order: relative to the gradient's own scale
        scale = float(ref_grads[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def backward(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), lora_grads(model)


def trl_trainer(kind, policy, reference, tokenizer, tmp_path, **args):
    from datasets import Dataset

    if kind == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    else:
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        rows = [
            {"prompt": "a", "completion": "b", "label": True},
            {"prompt": "c", "completion": "d", "label": False},
        ]
    config = Config(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        **args,
    )
    return Trainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize(
    "loss_type, smoothing, trl_loss, pairs",
    [
        ("sigmoid", 0.0, "sigmoid", 4),
        (
            "sigmoid",
            0.2,
            "aot",
            1,
        ),  # TRL 1.16 keeps cDPO's smoothing in "aot", whose sort is the identity on 1 pair
        ("ipo", 0.0, "ipo", 4),
        ("robust", 0.2, "robust", 4),
    ],
)
def test_dpo_losses_and_gradients_match_trl(tiny, tmp_path, loss_type, smoothing, trl_loss, pairs):
    policy, reference, tokenizer = tiny
    batch = pair_batch(tokenizer, pair_rows()[:pairs])
    cfg = PreferenceConfig(beta=0.3, dpo_loss=loss_type, label_smoothing=smoothing)
    ours = backward(policy, pair_losses("dpo", cfg, policy, batch, chunk_tokens=7)["losses"].mean())
    trainer = trl_trainer(
        "dpo",
        policy,
        reference,
        tokenizer,
        tmp_path,
        beta=0.3,
        loss_type=[trl_loss],
        label_smoothing=smoothing,
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    theirs = backward(policy, trainer._compute_loss(trainer.model, inputs, False))
    assert_same(*ours, *theirs)


def test_orpo_loss_and_gradients_match_trl(tiny):
    from trl.experimental.orpo import ORPOTrainer

    policy, _, tokenizer = tiny
    batch = pair_batch(tokenizer)
    out = pair_losses("orpo", PreferenceConfig(beta=0.25), policy, batch, chunk_tokens=5)
    n_chosen = int((batch["labels"][:4, 1:] != -100).sum())
    ours = backward(policy, out["nll_sum"] / n_chosen + out["losses"].mean())
    # TRL: its odds-ratio term on its own (full-logits) mean log-probs; the NLL of the chosen answers in
    # plain PyTorch (TRL's ORPO also scores the prompt tokens; cura follows the paper: the answer only)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    means = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    owner = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    or_losses, *_ = ORPOTrainer.odds_ratio_loss(owner, means[:4], means[4:])
    nll = F.cross_entropy(logits[:4, :-1].flatten(0, 1), batch["labels"][:4, 1:].flatten())
    theirs = backward(policy, nll - or_losses.mean())
    assert_same(*ours, *theirs)


def test_kto_loss_and_gradients_match_trl(tiny, tmp_path):
    policy, reference, tokenizer = tiny
    template, _ = effective_chat_template(tokenizer)
    rows = [
        {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen", "source": r["source"]}
        for r, key in zip(pair_rows(), ("chosen", "rejected", "rejected", "chosen"))
    ]
    samples = [encode_preference_row(tokenizer, template, r, DataConfig(max_length=128))[0] for r in rows]
    assign_kl_partners(samples, 4)
    batch = preference_batch(samples, [0, 1, 2, 3], 128, tokenizer.pad_token_id)
    cfg = PreferenceConfig(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    ours = backward(policy, kto_batch_losses(cfg, policy, batch, chunk_tokens=6)["losses"].mean())
    trainer = trl_trainer(
        "kto",
        policy,
        reference,
        tokenizer,
        tmp_path,
        beta=0.2,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        per_device_train_batch_size=4,
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
        "KL_input_ids": batch["kl_input_ids"],
        "KL_attention_mask": batch["kl_attention_mask"],
        "KL_completion_mask": (batch["kl_labels"] != -100).long(),
        "label": batch["kto_label"],
    }
    theirs = backward(policy, trainer._compute_loss(trainer.model, inputs, False))
    assert_same(*ours, *theirs)


def test_reference_is_the_base_with_the_adapter_off(tiny_source, chat_tokenizer):
    """On the 4-bit base: the adapter switched off gives exactly the log-probs of a separately loaded base."""
    from cura.models.loading import QuantSpec, load_checkpoint

    spec = QuantSpec("nf4", 64, True)
    base = load_checkpoint(Path(tiny_source), spec)
    policy = load_checkpoint(Path(tiny_source), spec)
    attach_lora(policy, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    for layer in lora_layers(policy).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    batch = pair_batch(chat_tokenizer)
    with torch.no_grad():
        expected, counts = sequence_logps(base, batch, 4096)
        tuned, _ = sequence_logps(policy, batch, 4096)
    assert torch.equal(reference_logps(policy, batch, 4096), expected)
    assert not torch.allclose(tuned, expected, atol=1e-3)  # the adapter does change the policy
    with lora_disabled(policy):
        assert not any(layer.enabled for layer in lora_layers(policy).values())
    assert all(layer.enabled for layer in lora_layers(policy).values())
    # the chunked sums equal full-logits log-probs of the scored tokens
    logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["labels"][:, 1:] != -100
    token = torch.gather(logits[:, :-1].log_softmax(-1), 2, batch["labels"][:, 1:].clamp(min=0)[..., None])[
        ..., 0
    ]
    torch.testing.assert_close(expected, (token * mask).sum(1), rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, mask.sum(1))


# ----------------------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_every_pair_shape_reads_to_the_same_rows(tmp_path):
    p, c, r = PAIRS[0]
    user = {"role": "user", "content": p}
    shapes = {
        "prompt_pairs": {"prompt": p, "chosen": c, "rejected": r},
        "message_pairs": {
            "chosen": [user, {"role": "assistant", "content": c}],
            "rejected": [user, {"role": "assistant", "content": r}],
        },
        "sharegpt_pairs": {
            "conversations": [{"from": "human", "value": p}],
            "chosen": {"from": "gpt", "value": c},
            "rejected": {"from": "gpt", "value": r},
        },
        "hh_pairs": {
            "chosen": f"\n\nHuman: {p}\n\nAssistant: {c}",
            "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}",
        },
    }
    for shape, record in shapes.items():
        (row,) = read_preference_rows(write_jsonl(tmp_path / f"{shape}.jsonl", [record]), paired=True)
        assert row["shape"] == shape
        assert (row["prompt"], row["chosen"], row["rejected"]) == ([user], c, r)
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: " + p + "\n\nAssistant: "
    (row,) = read_preference_rows(
        write_jsonl(tmp_path / "hh2.jsonl", [{"chosen": hh + c, "rejected": hh + r}]), True
    )
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"] and row["chosen"] == c
    kto = [
        {"messages": [user, {"role": "assistant", "content": c}], "label": True},
        {"prompt": p, "completion": r, "label": "false"},
    ]
    rows = [
        read_preference_rows(write_jsonl(tmp_path / f"k{i}.jsonl", [k]), paired=False)[0]
        for i, k in enumerate(kto)
    ]
    assert [(x["shape"], x["completion"], x["label"]) for x in rows] == [
        ("kto_messages", c, True),
        ("kto_completion", r, False),
    ]


def test_malformed_rows_get_file_line_errors(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            {"prompt": "q", "chosen": "", "rejected": "b"},
            "{not json",
            {"prompt": "q", "chosen": "a"},
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        ],
    )
    with pytest.raises(CuraError) as info:
        read_preference_rows(path, paired=True)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("5 bad preference rows in")
    assert [line.split(": ", 1)[0] for line in lines[1:]] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "'chosen' is empty" in lines[1] and "invalid JSON" in lines[2]
    assert "not preference data" in lines[3] and "turn 1 is 'assistant' where 'user' was expected" in lines[4]
    assert "must be the assistant's answer" in lines[5]
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": "maybe"}])
    with pytest.raises(CuraError, match=rf"{kto}:1: 'label' is 'maybe'; use true"):
        read_preference_rows(kto, paired=False)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}],
    )  # fmt: skip
    with pytest.raises(CuraError, match=rf"{pairs}:1: 'chosen' and 'rejected' must be the same conversation"):
        read_preference_rows(pairs, paired=True)


def test_scored_tokens_are_the_answer_and_its_end_marker(chat_tokenizer):
    batch = pair_batch(chat_tokenizer)
    for row, answer in ((0, PAIRS[0][1]), (4, PAIRS[0][2])):
        scored = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert chat_tokenizer.decode(scored) == answer + "<|im_end|>"
    # chosen and rejected share the prompt tokens exactly
    first_scored = [int((batch["labels"][i] != -100).nonzero()[0]) for i in (0, 4)]
    assert first_scored[0] == first_scored[1]
    assert torch.equal(batch["input_ids"][0, : first_scored[0]], batch["input_ids"][4, : first_scored[0]])


# ---------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, chat_tokenizer):
    from tiny import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama-pref"), chat_tokenizer)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref-data")
    words = ["red", "blue", "green", "tea", "rain", "stone", "bread", "salt", "wind", "moon", "fish", "lamp"]
    pairs = [
        {"prompt": f"Describe {w} briefly.", "chosen": f"{w.title()}.", "rejected": f"Well, {w} is a thing that I "
         f"could talk about at great length, and I will."}
        for w in words
    ]  # fmt: skip
    write_jsonl(folder / "pairs.jsonl", pairs[:10])
    write_jsonl(folder / "pairs_eval.jsonl", pairs[10:])
    kto = [
        {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
        for p in pairs
        for k in ("chosen", "rejected")
    ]
    write_jsonl(folder / "kto.jsonl", kto[:20])
    write_jsonl(folder / "kto_eval.jsonl", kto[20:])
    return folder


def pref_config(source, data, out, objective, **overrides) -> TrainConfig:
    name = "kto" if objective == "kto" else "pairs"
    settings = dict(
        model=source,
        output_dir=str(out),
        objective=objective,
        data=DataConfig(
            path=str(data / f"{name}.jsonl"), eval_path=str(data / f"{name}_eval.jsonl"), max_length=96
        ),
        lora=LoraConfig(r=4, alpha=8.0, dropout=0.1),
        lr=5e-3,
        max_steps=4,
        batch_size=2,
        save_every=2,
        progress=False,
        seed=3,
        compute_dtype="float32",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_second", "memory_bytes")}
        for r in rows
    ]


@pytest.mark.parametrize(
    "objective, precompute, grad_accum",
    [("dpo", False, 2), ("orpo", False, 1), ("kto", True, 1)],  # dpo precomputed: the eval test below
)
def test_preference_run_resumes_exactly(tiny_source, pref_data, tmp_path, objective, precompute, grad_accum):
    overrides = dict(
        preference=PreferenceConfig(beta=0.5, precompute_reference=precompute), grad_accum=grad_accum
    )
    reference = tmp_path / "reference"
    full = train(pref_config(tiny_source, pref_data, reference, objective, **overrides))
    rows = metric_rows(reference)
    assert full["completed"] and full["objective"] == objective and len(rows) == 4
    assert all(r["rewards/chosen"] is not None and r["rewards/margins"] is not None for r in rows)
    if objective != "kto":
        assert 0.0 <= rows[-1]["rewards/accuracies"] <= 1.0
        assert (
            full["eval_preference_accuracy_before"] is not None and full["eval_logp_margin_after"] is not None
        )
        if objective == "dpo":  # the base is the reference: its rewards are 0 before training
            assert full["eval_preference_before"]["rewards/margins"] == 0.0

    out = tmp_path / "interrupted"

    def interrupt_at_2(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(
        pref_config(tiny_source, pref_data, out, objective, **overrides),
        hooks=TrainHooks(on_step_end=interrupt_at_2),
    )
    assert (
        first["interrupted_by"] == "SIGINT" and latest_checkpoint(out / "checkpoints").name == "step-000002"
    )
    resumed = train(pref_config(tiny_source, pref_data, out, objective, resume=True, **overrides))
    assert resumed["completed"] and metric_rows(out) == rows
    assert resumed["eval_preference_before"] == full["eval_preference_before"]


def test_dpo_on_preference_data_needs_pairs(tiny_source, pref_data, tmp_path):
    config = pref_config(tiny_source, pref_data, tmp_path / "o", "dpo")
    config.data.path = str(pref_data / "kto.jsonl")
    with pytest.raises(CuraError, match="kto.jsonl:1: columns .* are not preference data"):
        train(config)
    assert not (tmp_path / "o").exists()


def test_planner_counts_two_sequences_per_pair():
    """DPO/ORPO batches hold chosen + rejected: the plan of batch B is the per-token plan of 2B sequences."""
    from cura.memory import plan
    from cura.memory.shapes import KNOWN_SHAPES
    from cura.train.plan import plan_spec

    shape = KNOWN_SHAPES["smollm2-135m"]
    data = DataConfig(max_length=256, packing=False)
    ckpt = dict(gradient_checkpointing=True)
    dpo = plan_spec(TrainConfig(objective="dpo", batch_size=2, data=data, **ckpt), "cuda")
    kto = plan_spec(TrainConfig(objective="kto", batch_size=2, data=data, **ckpt), "cuda")
    sft4 = plan_spec(TrainConfig(batch_size=4, data=data, **ckpt), "cuda")
    # the per-token plan, with the preference loss's chunks (checkpointed autograd cross-entropy, not
    # `loss_sum`'s in-place gradient)
    sft4 = dataclasses.replace(sft4, sft_loss=False)
    assert (dpo.rows, kto.rows, dpo.packing) == (4, 2, False)
    terms = {t.name: t.bytes for t in plan(shape, dpo).terms}
    assert terms == {t.name: t.bytes for t in plan(shape, sft4).terms}
    assert plan(shape, kto).peak_bytes < plan(shape, dpo).peak_bytes


def test_eval_on_preference_data_reports_what_training_measured(tiny_source, pref_data, tmp_path):
    """`cura eval --objective dpo`: base (adapter off) and adapter, the same numbers the run's summary holds
    (whose reference was precomputed before training)."""
    from cura.evaluate.preference import evaluate_preference_file, preference_table
    from cura.generate import load_for_inference

    out = tmp_path / "run"
    precomputed = PreferenceConfig(precompute_reference=True)  # the stored reference = the adapter-off one
    config = pref_config(
        tiny_source, pref_data, out, "dpo", max_steps=2, save_every=0, preference=precomputed
    )
    summary = train(config)
    model, tokenizer = load_for_inference(tiny_source, str(out / "adapter"), compute_dtype="float32")
    result = evaluate_preference_file(
        model, tokenizer, str(pref_data / "pairs_eval.jsonl"), objective="dpo", batch_size=2, max_length=96
    )
    assert result["examples"] == 2
    for key in ("preference_accuracy", "logp_margin", "rewards/margins"):
        assert result["base"][key] == pytest.approx(summary["eval_preference_before"][key], abs=1e-5)
        assert result["adapter"][key] == pytest.approx(summary["eval_preference_after"][key], abs=1e-4)
    assert "| preference_accuracy |" in preference_table(result)


def test_settings_that_make_no_sense_are_refused(chat_tokenizer, pref_data):
    with pytest.raises(CuraError, match="'preference.label_smoothing' has no meaning for .* ipo"):
        PreferenceConfig(dpo_loss="ipo", label_smoothing=0.1)
    with pytest.raises(CuraError, match=r"'preference.label_smoothing' must be in \[0, 0.5\)"):
        PreferenceConfig(label_smoothing=0.5)
    with pytest.raises(CuraError, match="'batch_size' must be at least 2 for kto"):
        build_preference_datasets(
            DataConfig(path=str(pref_data / "kto.jsonl")), chat_tokenizer, paired=False, batch_size=1
        )


@pytest.mark.slow
def test_dpo_demo_raises_held_out_preference_accuracy_on_the_bundled_model(smollm2_gguf, tmp_path):
    """`cura train --demo dpo`, shortened to 10 steps and 12 held-out pairs (about a minute on 2 idle cores):
    on the shipped house-style pairs DPO must raise the bundled model's held-out preference accuracy and
    margin, and the demo must say so with exit code 0. On ../shared/data/dpo-en-demo a run this short does
    not move the accuracy (its 300 pairs disagree in kind: README, preference section), so the demo's
    pairs carry the check."""
    import subprocess
    import sys

    from cura.demo.dpo import EVAL_FILE

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(
        "".join(EVAL_FILE.read_text(encoding="utf-8").splitlines(True)[:12]), encoding="utf-8"
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cura", "train", "--demo", "dpo", "--max-steps", "10", "--save-every", "0"]
        + ["--eval-data", str(eval_file), "--output", str(out), "--progress", "false"],
        env=dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false"),
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only (10x a loaded 2-core run), never a speed check
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_preference_accuracy_before"], summary["eval_preference_accuracy_after"]
    assert after > before, (before, after)
    assert summary["eval_logp_margin_after"] > summary["eval_logp_margin_before"] + 5
    assert "preference accuracy (held-out pairs)" in proc.stdout
    assert (out / "demo.md").is_file()


def test_dpo_demo_pairs_are_generated_and_held_out_names_are_unseen(tmp_path):
    """The shipped pairs are what `python -m cura.demo.make_pairs` writes (byte for byte); no held-out name or
    city occurs in training; every chosen answer is in the house style, every rejected one is prose or the
    house style with another (wrong) fact, about half each."""
    from cura.demo import dpo, make_pairs

    make_pairs.write(tmp_path)
    for path in (dpo.TRAIN_FILE, dpo.EVAL_FILE):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()
    train_rows = [json.loads(x) for x in dpo.TRAIN_FILE.read_text(encoding="utf-8").splitlines()]
    eval_rows = [json.loads(x) for x in dpo.EVAL_FILE.read_text(encoding="utf-8").splitlines()]
    train_text = " ".join(r["prompt"] for r in train_rows)
    for name in make_pairs.EVAL_NAMES + make_pairs.EVAL_CITIES:
        assert name not in train_text
    for row in train_rows + eval_rows:
        assert dpo.house_style(row["chosen"]) and row["rejected"] != row["chosen"]
    wrong_fact = sum(dpo.house_style(r["rejected"]) for r in train_rows) / len(train_rows)
    assert 0.4 < wrong_fact < 0.6


def test_demo_dpo_flag_builds_the_dpo_demo_and_the_user_wins(tmp_path):
    import argparse

    from cura.cli.train import build_config, register
    from cura.demo import dpo

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--demo", "dpo", "--max-steps", "3", "--output", str(tmp_path / "o")])
    config, kind = build_config(args)
    assert kind == "dpo"
    assert config.objective == "dpo" and config.max_steps == 3
    assert config.data.path == str(dpo.TRAIN_FILE) and config.data.eval_path == str(dpo.EVAL_FILE)
    assert config.preference.beta == dpo.DPO_DEMO["preference"]["beta"]
