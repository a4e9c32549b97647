"""GGUF exports verified in llama.cpp itself (xllamacpp embeds its server): the chat prompt llama.cpp renders
from the file (--jinja) and its token ids equal transformers', greedy answers agree token for token, stop at
the end-of-turn token, and teacher-forced perplexity agrees, on a tiny model and (slow) on a short demo
adapter of the bundled SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cura.export import export_gguf

pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed: pip install 'cura[llamacpp]'")

DEMO = Path(__file__).resolve().parents[1] / "src" / "cura" / "demo"
HANG_GUARD_SECONDS = 1800  # a guard against a hang only: a short run takes ~1 minute on 2 idle cores


def quiet(*_):
    pass


def test_tiny_f16_export_runs_identically_in_llamacpp(tmp_path, chat_tokenizer):
    from tiny import tiny_config

    config = tiny_config("llama")
    config.vocab_size = len(chat_tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "base"))
    chat_tokenizer.save_pretrained(str(tmp_path / "base"))
    report = export_gguf(tmp_path / "base", tmp_path / "t.gguf", out_type="f16", verify=True, log=quiet)
    cpp = report.llamacpp
    assert cpp["prompt_identical"] and cpp["ids_identical"] and cpp["answers"] == 3
    assert cpp["kept_rate"] == 1.0 and cpp["max_logprob_diff"] < 0.01
    assert abs(cpp["perplexity_margin"]) < 1e-3  # a random model: perplexity ~300, same in both
    saved = json.loads((tmp_path / "t.gguf.verify.json").read_text())
    assert saved["llamacpp"]["answers"] == 3


@pytest.fixture(scope="module")
def demo_merged(tmp_path_factory, smollm2_gguf):
    """A short demo adapter (6 steps of the demo data, eval file recorded) merged into its base once."""
    from cura.export import merge

    root = tmp_path_factory.mktemp("demo-export")
    args = [
        "train",
        "--data",
        str(DEMO / "orders_train.jsonl"),
        "--eval-data",
        str(DEMO / "orders_eval.jsonl"),
    ]
    args += ["--max-steps", "6", "--lr", "1e-3", "--output", "run", "--progress", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "cura", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    merge(None, root / "run" / "adapter", root / "merged", log=quiet)
    return root / "merged"


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f16", "q4_k_m"])
def test_demo_adapter_export_verified_in_llamacpp(demo_merged, tmp_path, out_type):
    from cura.export.llamacpp import BOUNDS

    report = export_gguf(
        demo_merged, tmp_path / f"demo-{out_type}.gguf", out_type=out_type, verify=True, log=print
    )
    cpp = report.llamacpp
    assert "orders_eval.jsonl" in cpp["prompts_from"] and cpp["answers"] == 8
    assert cpp["prompt_identical"] and cpp["ids_identical"]
    assert cpp["kept_rate"] >= BOUNDS[out_type].identical
    assert all(
        a["stopped_llamacpp"] == a["stopped_transformers"] for a in cpp["per_answer"] if a["identical"]
    )
    if out_type == "f16":  # the fine-tuned answers end their turn at <|im_end|> in both runtimes
        assert (
            cpp["stop_token"] == "<|im_end|>" and cpp["stopped_llamacpp"] == cpp["stopped_transformers"] > 0
        )
    assert cpp["perplexity_margin"] <= BOUNDS[out_type].perplexity
    assert report.max_abs_logit_diff <= report.tolerance  # the writer check passes on a correct file
    assert (tmp_path / f"demo-{out_type}.Modelfile").is_file()
