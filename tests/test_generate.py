"""`cura generate` and `cura chat` as real processes, against the Python API on the same model + adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cura.generate import generate, load_for_inference

NEW_TOKENS = "6"


@pytest.fixture(scope="module")
def tiny_with_adapter(tmp_path_factory, chat_tokenizer):
    """A tiny random llama with the tiny ChatML tokenizer, and a non-trivial adapter for it."""
    from transformers import AutoModelForCausalLM

    from cura.adapters import LoraConfig, attach_lora, save_adapter
    from tiny import tiny_config

    folder = tmp_path_factory.mktemp("gen")
    config = tiny_config("llama")
    config.vocab_size = len(chat_tokenizer)
    config.eos_token_id = chat_tokenizer.eos_token_id
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder / "base")
    chat_tokenizer.save_pretrained(folder / "base")
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.0)
    attach_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, lora, folder / "adapter", base_model_name_or_path=str(folder / "base"))
    return folder / "base", folder / "adapter"


def _cura(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "cura", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _api(base, adapter, conversations):
    model, tokenizer = load_for_inference(str(base), adapter, compute_dtype="float32")
    return [generate(model, tokenizer, [c], max_new_tokens=int(NEW_TOKENS))[0] for c in conversations]


def test_generate_prints_what_the_api_generates(tiny_with_adapter):
    base, adapter = tiny_with_adapter
    proc = _cura(
        "generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "Name a colour.",
        "--max-new-tokens", NEW_TOKENS, "--dtype", "float32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (expected,) = _api(base, adapter, [[{"role": "user", "content": "Name a colour."}]])
    assert expected and proc.stdout.strip() == expected
    # without --model, the base is the one the adapter names
    again = _cura(
        "generate",
        "--adapter",
        str(adapter),
        "--prompt",
        "Name a colour.",
        "--max-new-tokens",
        NEW_TOKENS,
        "--dtype",
        "float32",
    )
    assert again.returncode == 0 and again.stdout == proc.stdout
    assert f"base model: {base} (from {adapter}/adapter_config.json; --model overrides it)" in again.stderr
    # the adapter changes the answer (it is really loaded)
    (plain,) = _api(base, None, [[{"role": "user", "content": "Name a colour."}]])
    assert plain != expected


def test_chat_keeps_the_history_and_resets(tiny_with_adapter):
    base, adapter = tiny_with_adapter
    proc = _cura(
        "chat", "--model", str(base), "--adapter", str(adapter), "--max-new-tokens", NEW_TOKENS,
        "--dtype", "float32", "--system", "Be brief.",
        stdin="Hello there\nAnd then?\n/reset\nHello there\n/exit\nnever read\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    replies = [
        line.removeprefix("assistant> ")
        for line in proc.stdout.splitlines()
        if line.startswith("assistant> ")
    ]
    assert len(replies) == 3 and "(conversation cleared)" in proc.stdout
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "Hello there"}]
    first_reply = _api(base, adapter, [first])[0]
    second = first + [{"role": "assistant", "content": first_reply}, {"role": "user", "content": "And then?"}]
    assert [r.strip() for r in replies] == [first_reply, _api(base, adapter, [second])[0], first_reply]


def test_generate_and_chat_user_errors_are_one_line(tmp_path):
    for command in ("generate", "chat"):
        args = ["--model", str(tmp_path / "missing")] + (["--prompt", "hi"] if command == "generate" else [])
        proc = _cura(command, *args, stdin="")
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: model source") and "Traceback" not in proc.stderr


def test_chat_reports_a_failed_generation_and_exits_instead_of_hanging(tiny_with_adapter):
    """Generation raising in chat's worker thread (here cura.generate refuses top_p=-1) must
    end the stream: one error line and a non-zero exit, not a reader waiting forever on the streamer."""
    base, adapter = tiny_with_adapter
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cura", "chat", "--model", str(base), "--adapter", str(adapter),
             "--dtype", "float32", "--max-new-tokens", NEW_TOKENS, "--temperature", "1", "--top-p", "-1"],
            input="Hello there\nnever answered\n", capture_output=True, text=True, timeout=120,
            env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("cura chat hung after generation failed in its worker thread")
    assert proc.returncode == 1, proc.stderr
    assert "error: generation failed (CuraError: --top-p is -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.count("assistant> ") == 1
