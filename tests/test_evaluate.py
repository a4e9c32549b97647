"""cura.evaluate: metrics against their reference packages, extractors, answer-token loss against
transformers, batched vs unbatched greedy generation, the `cura eval` command end to end."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from cura.errors import CuraError
from cura.evaluate import (
    EvalRow,
    answer_loss,
    bleu,
    chrf,
    encode_rows,
    evaluate,
    exact_match,
    extract_choice,
    extract_gsm8k,
    get_extractor,
    normalize,
    parse_fields,
    parse_metrics,
    read_eval_rows,
    read_text_pairs,
    rouge,
)
from cura.evaluate.metrics import regex_extractor

PREDS = [
    "The cat sat on the mat while the dogs were running.",
    "Person1 asks Person2 to send the memo by email today.",
    "It is raining heavily in Berlin this morning.",
]
REFS = [
    ["A cat was sitting on the mat.", "The cat sat on a mat as dogs ran around."],
    ["Person1 wants Person2 to email the memo.", "#Person1# dictates a memo to #Person2#."],
    ["Heavy rain fell in Berlin this morning.", "This morning it rained a lot in Berlin."],
]


# ---- metrics against the reference packages -------------------------------------------------------


def test_rouge_matches_rouge_score_single_and_multi_reference():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    single = rouge(PREDS, [[r[0]] for r in REFS])
    multi = rouge(PREDS, REFS)
    for kind in ("rouge1", "rouge2", "rougeL"):
        want_single = sum(scorer.score(r[0], p)[kind].fmeasure for p, r in zip(PREDS, REFS)) / 3
        want_multi = sum(scorer.score_multi(r, p)[kind].fmeasure for p, r in zip(PREDS, REFS)) / 3
        assert single[kind] == pytest.approx(100 * want_single, abs=1e-9)
        assert multi[kind] == pytest.approx(100 * want_multi, abs=1e-9)
        assert multi[kind] >= single[kind]


def test_bleu_and_chrf_match_sacrebleu_corpus_scores():
    one = [[r[0]] for r in REFS]
    assert bleu(PREDS, one) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [[r[0] for r in REFS]]).score)
    assert chrf(PREDS, one) == pytest.approx(sacrebleu.corpus_chrf(PREDS, [[r[0] for r in REFS]]).score)
    streams = [[r[0] for r in REFS], [r[1] for r in REFS]]
    assert bleu(PREDS, REFS) == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score)
    assert chrf(PREDS, REFS) == pytest.approx(sacrebleu.corpus_chrf(PREDS, streams).score)
    assert bleu(PREDS, REFS) > bleu(PREDS, one)


def test_uneven_reference_counts_pad_without_changing_scores():
    """A sample with fewer references is padded with its first: same as giving that reference twice."""
    uneven = [REFS[0], [REFS[1][0]], REFS[2]]
    streams = [[r[0] for r in uneven], [REFS[0][1], REFS[1][0], REFS[2][1]]]
    assert bleu(PREDS, uneven) == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score)
    assert chrf(PREDS, uneven) == pytest.approx(sacrebleu.corpus_chrf(PREDS, streams).score)
    # duplicating a single reference changes nothing
    one = [[r[0]] for r in REFS]
    assert bleu(PREDS, [[r[0], r[0]] for r in REFS]) == pytest.approx(bleu(PREDS, one))
    assert chrf(PREDS, [[r[0], r[0]] for r in REFS]) == pytest.approx(chrf(PREDS, one))


def test_identical_strings_score_100():
    refs = [[p] for p in PREDS]
    assert rouge(PREDS, refs) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert bleu(PREDS, refs) == pytest.approx(100.0)
    assert chrf(PREDS, refs) == pytest.approx(100.0)
    assert exact_match(PREDS, refs) == 100.0


def test_metrics_refuse_mismatched_lengths_and_bare_strings():
    with pytest.raises(ValueError):
        rouge(PREDS, REFS[:2])
    with pytest.raises(ValueError):
        bleu(["a"], ["a"])  # a bare string is not a list of references


# ---- exact match and extractors (hand-computed) ---------------------------------------------------


def test_gsm8k_extractor_reads_gold_and_model_answers():
    assert extract_gsm8k("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert extract_gsm8k("#### 1,234") == "1234"
    assert extract_gsm8k("So the answer is 42.") == "42"
    assert extract_gsm8k("3 apples and 4 pears make 7 fruits, costing $12.50 in total.") == "12.5"
    assert extract_gsm8k("It is 18.00 dollars") == "18"
    assert extract_gsm8k("-5 degrees") == "-5"
    assert extract_gsm8k("no digits here") == ""


def test_choice_and_regex_extractors():
    assert extract_choice("The answer is (C).") == "C"
    assert extract_choice("B. 8") == "B"
    assert extract_choice("Definitely D") == "D"
    assert extract_choice("Both are Absent") == ""  # no standalone letter
    assert extract_choice("E is not an option, A is") == "A"
    assert regex_extractor(r"answer: (\w+)")("The answer: Paris!") == "Paris"
    assert regex_extractor(r"\d+")("x 12 y 34") == "12"
    assert get_extractor("regex:yes|no")("I say no") == "no"
    assert get_extractor("none")("  Keep  ") == "  Keep  "
    with pytest.raises(CuraError, match="extractor"):
        get_extractor("gsm9k")
    with pytest.raises(CuraError, match="regular expression"):
        get_extractor("regex:(unclosed")


def test_exact_match_hand_computed():
    assert normalize("  The  Answer\nIS 4 ") == "the answer is 4"
    preds = ["The total is 18 dollars.", "I think 7", "#### 3", "nothing"]
    refs = [["... #### 18"], ["#### 8"], ["#### 3"], ["#### 0"]]
    assert exact_match(preds, refs, "gsm8k") == pytest.approx(100 * 2 / 4)
    preds = ["answer: B", "C", "(a)", ""]
    refs = [["B"], ["D", "C"], ["A"], ["A"]]
    assert exact_match(preds, refs, "choice") == pytest.approx(100 * 2 / 4)  # '(a)' is lowercase: no choice
    assert exact_match(["  Paris "], [["paris"]], "none") == 100.0
    assert exact_match([""], [[""]]) == 0.0  # an empty answer never matches


def test_parse_metrics_and_fields():
    assert parse_metrics("loss, rouge,perplexity") == ["loss", "rouge"]
    assert parse_metrics(None) is None
    with pytest.raises(CuraError, match="unknown metric 'meteor'"):
        parse_metrics("loss,meteor")
    assert parse_fields(["reference=summary1,summary2", "prompt=dialogue"]) == {
        "reference": "summary1,summary2",
        "prompt": "dialogue",
    }
    with pytest.raises(CuraError, match="KEY=COLUMN"):
        parse_fields(["reference"])


# ---- reading rows ------------------------------------------------------------------------------


def test_read_rows_multi_reference_fields_and_text_pairs(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"dialogue": "A: hi", "summary1": "s1", "summary2": "s2", "summary3": "s3"}) + "\n",
        encoding="utf-8",
    )
    rows = read_eval_rows(data, fields={"prompt": "dialogue", "reference": "summary1,summary2,summary3"})
    assert rows == [EvalRow([{"role": "user", "content": "A: hi"}], ("s1", "s2", "s3"))]
    with pytest.raises(CuraError, match=r"d\.jsonl:1: no column 'summary9'"):
        read_eval_rows(data, fields={"prompt": "dialogue", "reference": "summary9"})
    src, ref = tmp_path / "src.de", tmp_path / "ref.en"
    src.write_text("Hallo Welt\nGuten Morgen\n", encoding="utf-8")
    ref.write_text("Hello world\nGood morning\n", encoding="utf-8")
    rows = read_text_pairs(src, ref, instruction="Translate to English.")
    assert rows[1].prompt[-1]["content"] == "Translate to English.\n\nGuten Morgen"
    assert rows[1].references == ("Good morning",)
    ref.write_text("Hello world\n", encoding="utf-8")
    with pytest.raises(CuraError, match="line-aligned"):
        read_eval_rows(src, references=ref)


def test_read_rows_messages_split_at_final_assistant_turn(tmp_path):
    data = tmp_path / "chat.jsonl"
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    data.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    (row,) = read_eval_rows(data)
    assert row.prompt == messages[:-1]
    assert row.references == ("4",)


def cli(argv: list[str]) -> int:
    """`cura <argv>` in this process, through the CLI's own entry point."""
    from cura.cli import main

    return main(argv)


# ---- loss, generation and the command on tiny models ---------------------------------------------


def test_answer_loss_equals_transformers_loss(make_tiny):
    model = make_tiny("llama", seed=1)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for length, prompt_len in ((9, 4), (14, 10), (6, 1)):
        ids = torch.randint(3, 320, (length,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    with torch.no_grad():
        refs = [
            model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])).loss.item()
            for s in samples
        ]
    counts = [sum(lab != -100 for lab in s["labels"][1:]) for s in samples]
    single = answer_loss(model, samples[:1], batch_size=1)
    assert single.loss == pytest.approx(refs[0], rel=1e-5)
    assert single.perplexity == pytest.approx(math.exp(refs[0]), rel=1e-5)
    batched = answer_loss(model, samples, batch_size=3)  # right padding must not change anything
    want = sum(r * c for r, c in zip(refs, counts)) / sum(counts)
    assert batched.tokens == sum(counts)
    assert batched.loss == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def chat_tiny(chat_tokenizer):
    """A tiny llama with the tiny ChatML tokenizer's vocabulary (random weights)."""
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    config = tiny_config("llama")
    config.vocab_size = len(chat_tokenizer)
    config.pad_token_id = chat_tokenizer.pad_token_id or 0
    config.eos_token_id = chat_tokenizer.eos_token_id
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


ROWS = [
    EvalRow([{"role": "user", "content": "Name a colour."}], ("Blue is a colour.",)),
    EvalRow([{"role": "user", "content": "What is 2 + 2? Answer with one number please."}], ("4",)),
    EvalRow([{"role": "user", "content": "Say hi"}], ("hi",)),
]


def test_encode_rows_masks_prompt_and_loss_matches_transformers(chat_tiny, chat_tokenizer):
    samples = encode_rows(chat_tokenizer, ROWS)
    prompt = chat_tokenizer.apply_chat_template(ROWS[0].prompt, tokenize=False, add_generation_prompt=True)
    n_prompt = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    s = samples[0]
    assert s["labels"][:n_prompt] == [-100] * n_prompt
    answer = chat_tokenizer.decode(s["input_ids"][n_prompt:])
    assert answer.startswith("Blue is a colour.") and "<|im_end|>" in answer
    with torch.no_grad():
        want = chat_tiny(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])).loss
    result = evaluate(chat_tiny, chat_tokenizer, ROWS[:1], ["loss"], progress=False)
    assert result.metrics["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_batched_generation_equals_unbatched(chat_tiny, chat_tokenizer):
    kwargs = dict(max_new_tokens=8, extractor="none", progress=False)
    batched = evaluate(chat_tiny, chat_tokenizer, ROWS, ["rouge", "exact_match"], batch_size=3, **kwargs)
    single = evaluate(chat_tiny, chat_tokenizer, ROWS, ["rouge", "exact_match"], batch_size=1, **kwargs)
    assert [s["prediction"] for s in batched.samples] == [s["prediction"] for s in single.samples]
    assert batched.metrics == single.metrics
    assert any(s["prediction"] for s in batched.samples)
    assert evaluate(chat_tiny, chat_tokenizer, ROWS, limit=2, max_new_tokens=2, progress=False).n_samples == 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, chat_tiny, chat_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-chat")
    chat_tiny.save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return folder


def _adapter(folder, seed: int, template: str | None = None):
    from transformers import AutoModelForCausalLM

    from cura.adapters import LoraConfig, attach_lora, save_adapter
    from tiny import tiny_config  # noqa: F401  (the conftest path)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    attach_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = folder.parent / f"adapter-{seed}"
    save_adapter(model, config, out, base_model_name_or_path=str(folder), chat_template=template)
    return out


def test_cli_eval_and_compare_end_to_end(tiny_folder, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    rows = [
        {"question": "How many legs has a cat?", "answer": "Four legs.\n#### 4"},
        {"question": "What is 5 + 3?", "answer": "5 + 3 = 8\n#### 8"},
        {"question": "Half of 10?", "answer": "#### 5"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = [
        "eval",
        "--model",
        str(tiny_folder),
        "--data",
        str(data),
        "--no-quantize",
        "--max-new-tokens",
        "4",
    ]
    assert cli([*common, "--json", "--extractor", "gsm8k", "--limit", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {
        "loss",
        "perplexity",
        "rouge1",
        "rouge2",
        "rougeL",
        "bleu",
        "chrf",
        "exact_match",
    }
    assert result["n_samples"] == 2 and len(result["samples"]) == 2
    assert math.isfinite(result["metrics"]["loss"])

    adapter = _adapter(
        tiny_folder, seed=1, template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    out = tmp_path / "report"
    args = [
        *common,
        "--compare",
        "--adapter",
        str(adapter),
        "--output",
        str(out),
        "--metrics",
        "loss,rouge,chrf",
    ]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "different chat template" in captured.err
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | base | adapter adapter-1 | delta |" in report and "## Example generations" in report
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert set(saved["before"]["metrics"]) == {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "chrf"}
    assert saved["deltas"]["loss"] == pytest.approx(
        saved["after"]["metrics"]["loss"] - saved["before"]["metrics"]["loss"]
    )
    assert (
        saved["before"]["metrics"]["loss"] != saved["after"]["metrics"]["loss"]
    )  # the adapter changes the model
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    adapter_b = _adapter(tiny_folder, seed=2)
    out_b = tmp_path / "ab"
    pair = ["--compare", "--adapter", str(adapter), "--adapter-b", str(adapter_b), "--output", str(out_b)]
    assert cli([*common, *pair, "--metrics", "loss"]) == 0
    saved = json.loads((out_b / "eval.json").read_text(encoding="utf-8"))
    assert saved["before"]["label"] == "A: adapter-1" and saved["after"]["label"] == "B: adapter-2"


ORDERS = [
    {
        "question": f"Convert this order to JSON. Please send {n} kettles to Split.",
        "answer": json.dumps({"item": "kettle", "quantity": n, "city": "Split"}),
    }
    for n in range(2, 14)
]


def test_cura_eval_loss_is_the_training_held_out_loss(tiny_folder, tmp_path, capsys):
    """The same rows and the same model: `cura eval`'s loss equals the held-out loss `cura train` logs
    before its first step (LoRA B starts at zero, so the model is still the base), whether the rows are
    read by format detection or through explicit --field columns (which once had their own tokenization,
    training the newline after the end-of-turn marker)."""
    from cura.adapters import LoraConfig
    from cura.data import DataConfig
    from cura.train import TrainConfig, train

    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in ORDERS[:4]), encoding="utf-8")
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in ORDERS[4:]), encoding="utf-8")
    config = TrainConfig(
        model=str(tiny_folder),
        method="lora",
        output_dir=str(tmp_path / "run"),
        data=DataConfig(path=str(train_file), eval_path=str(eval_file)),
        lora=LoraConfig(r=2, alpha=4.0, dropout=0.0),
        max_steps=1,
        batch_size=2,
        progress=False,
        compute_dtype="float32",
    )
    train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["eval_samples"] == len(ORDERS) - 4
    args = [
        "eval",
        "--model",
        str(tiny_folder),
        "--data",
        str(eval_file),
        "--no-quantize",
        "--dtype",
        "float32",
    ]
    for fields in ([], ["--field", "prompt=question", "--field", "reference=answer"]):
        assert cli([*args, *fields, "--metrics", "loss", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["metrics"]["loss"] == pytest.approx(summary["eval_loss_before"], rel=1e-5), fields


def test_cli_user_errors_are_one_line(tiny_folder, tmp_path, capsys):
    assert cli(["eval", "--model", str(tiny_folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["eval", "--data", "x.jsonl", "--compare"]) == 2
    assert "--compare needs --adapter" in capsys.readouterr().err
    assert cli(["eval", "--data", "x.jsonl", "--metrics", "bleurt"]) == 2
    assert "unknown metric" in capsys.readouterr().err


# ---- the bundled real model on real data -----------------------------------------------------------


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads spin-wait on each other (measured: greedy
    decoding 15x slower under load); on an idle machine 1 thread costs well under 2x here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_bundled_model_on_real_benchmarks(shared_data, smollm2_gguf, one_thread):
    from cura.models import load_model

    loaded = load_model("smollm2-135m", quantize=True)
    model, tok = loaded.model, loaded.tokenizer
    kw = dict(limit=3, batch_size=3, progress=False)

    rows = read_eval_rows(
        shared_data / "dialogsum" / "dialogsum.test.jsonl",
        fields={"prompt": "dialogue", "reference": "summary1,summary2,summary3"},
        system_prompt="Summarize the dialogue in one sentence.",
    )
    assert len(rows) == 500 and all(len(r.references) == 3 for r in rows)
    rows = sorted(rows[:60], key=lambda r: len(r.prompt[-1]["content"]))  # the shortest dialogues: CPU time
    res = evaluate(model, tok, rows, ["loss", "rouge"], max_new_tokens=32, **kw)
    preds, refs = _predictions(res)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rougeL"):
        want = 100 * sum(scorer.score_multi(r, p)[kind].fmeasure for p, r in zip(preds, refs)) / len(preds)
        assert res.metrics[kind] == pytest.approx(want, abs=1e-9)
    assert 1.0 < res.metrics["perplexity"] < 1000 and res.metrics["perplexity"] == pytest.approx(
        math.exp(res.metrics["loss"])
    )

    wmt = shared_data / "wmt22-de-en"
    rows = read_eval_rows(
        wmt / "generaltest2022.de-en.src.de",
        references=wmt / "generaltest2022.de-en.ref.A.en",
        instruction="Translate this German text to English.",
    )
    res = evaluate(model, tok, rows, ["bleu", "chrf"], max_new_tokens=32, **kw)
    preds, refs = _predictions(res)
    streams = [[r[0] for r in refs]]
    assert res.metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert res.metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    assert res.metrics["chrf"] > 5  # a translation, not noise

    rows = read_eval_rows(shared_data / "gsm8k" / "test.jsonl")
    assert extract_gsm8k(rows[0].references[0]) == "18"
    res = evaluate(model, tok, rows, ["exact_match"], extractor="gsm8k", max_new_tokens=32, **kw)
    preds, refs = _predictions(res)
    hits = [
        _last_number(p) is not None and _last_number(p) == _last_number(r[0]) for p, r in zip(preds, refs)
    ]
    assert res.metrics["exact_match"] == pytest.approx(100 * sum(hits) / len(hits))

    rows = read_eval_rows(shared_data / "mmlu-val" / "zero_shot_mmlu_val.json")
    assert rows[0].references == ("A",)
    res = evaluate(model, tok, rows, ["exact_match", "loss"], extractor="choice", max_new_tokens=4, **kw)
    preds, refs = _predictions(res)
    assert refs == [["A"], ["B"], ["A"]]
    hits = [_first_choice(p) == r[0] for p, r in zip(preds, refs)]
    assert res.metrics["exact_match"] == pytest.approx(100 * sum(hits) / len(hits)) and res.loss_tokens > 0


def _predictions(result) -> tuple[list[str], list[list[str]]]:
    return [s["prediction"] for s in result.samples], [s["references"] for s in result.samples]


def _last_number(text: str) -> float | None:
    """GSM8K by hand: the number after '####' if there is one, else the last number in the text."""
    import re

    tail = text.split("####")[-1]
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    return float(numbers[-1].replace(",", "")) if numbers else None


def _first_choice(text: str) -> str:
    """A multiple-choice answer by hand: the first standalone capital A-D."""
    import re

    found = re.search(r"\b([A-D])\b", text)
    return found.group(1) if found else ""


def test_eval_never_writes_over_a_users_files(tmp_path, capsys):
    """A report folder holding the user's report.md (or a foreign eval.json) is refused in one sentence
    before anything loads (the model named here does not even exist); cura's own earlier report is replaced."""
    from cura.atomic import write_json
    from cura.evaluate.outputs import COMPARISON_FILES, RESULT_FILES, check_report_folder

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"question": "2 + 2?", "answer": "4"}) + "\n", encoding="utf-8")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes", encoding="utf-8")
    args = ["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--output", str(mine)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"--output {mine} already holds report.md that cura eval did not write" in err
    assert "no-such-model" not in err  # refused before the model was looked at
    assert (mine / "report.md").read_text(encoding="utf-8") == "my own notes"
    write_json(mine / "eval.json", {"loss": 1.0})  # a JSON someone else wrote: still refused
    with pytest.raises(CuraError, match="already holds eval.json, report.md that cura eval did not write"):
        check_report_folder(mine, COMPARISON_FILES)
    ours = tmp_path / "ours"
    write_json(ours / "eval.json", {"written_by": "cura eval"})
    (ours / "report.md").write_text("an earlier report", encoding="utf-8")
    check_report_folder(ours, RESULT_FILES)  # cura's own report: replaced without a question
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    with pytest.raises(CuraError, match="is a file; give a folder"):
        check_report_folder(tmp_path / "a-file", RESULT_FILES)
