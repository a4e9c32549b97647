"""The base record: a run trained on FP4, blocksize 128, no double quantization is merged, exported and
generated from on exactly that base (its logits reproduced), and a mismatched base is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cura.adapters import LoraConfig, attach_lora, check_same_base, load_base_for_adapter, save_adapter
from cura.errors import CuraError
from cura.models import BaseSpec
from cura.nn.linear4bit import Linear4bit

DEMO_TRAIN = Path(__file__).resolve().parents[1] / "src" / "cura" / "demo" / "orders_train.jsonl"
QUANT = dict(quant_type="fp4", blocksize=128, double_quant=False)  # nothing a default would guess
QUIET = lambda *_: None  # noqa: E731


def save_tiny_base(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny Llama with the real SmolLM2 tokenizer (and its chat template), as a transformers folder."""
    from tiny import tiny_config

    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smol_tokenizer):
    """A short real training run (FP4, blocksize 128, no DQ) and the trained model's logits on samples."""
    from cura.data import DataConfig
    from cura.export.merge import sample_ids
    from cura.train import TrainConfig, train

    root = tmp_path_factory.mktemp("base-record")
    base = save_tiny_base(root / "base", smol_tokenizer)
    lines = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")
    config = TrainConfig(
        model=str(base),
        output_dir=str(root / "run"),
        data=DataConfig(path=str(root / "train.jsonl"), eval_split=0, max_length=96),
        lora=LoraConfig(r=4, alpha=16.0, dropout=0.0),
        lr=2e-2,
        max_steps=4,
        batch_size=2,
        save_every=2,
        progress=False,
        compute_dtype="float32",
        **QUANT,
    )
    result = train(config, say=QUIET)
    model = result.model.eval()
    samples = sample_ids(result.tokenizer, result.tokenizer.chat_template)
    with torch.no_grad():
        logits = [model(input_ids=ids).logits.float() for ids in samples]
    return config, root / "run" / "adapter", samples, logits


def max_diff(model, samples, reference) -> float:
    with torch.no_grad():
        return max(
            (model(input_ids=s).logits.float() - r).abs().max().item() for s, r in zip(samples, reference)
        )


def test_every_adapter_and_checkpoint_records_the_whole_base(trained, smol_tokenizer):
    from peft import PeftModel

    config, adapter, _, _ = trained
    expected = BaseSpec.from_config(
        config, chat_template=smol_tokenizer.chat_template, chat_template_source="tokenizer"
    )
    checkpoints = sorted((adapter.parent / "checkpoints").glob("step-*"))
    assert checkpoints
    for folder in [adapter, *checkpoints]:
        record = json.loads((folder / "cura_adapter.json").read_text())["base"]
        assert BaseSpec.from_dict(record) == expected and record == expected.to_dict()
    assert (expected.source, expected.quant_text()) == (
        config.model,
        "FP4, blocksize 128, no double quantization",
    )
    # adapter_config.json names a base PEFT can open (cura's own name stays in cura's record)
    peft_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(peft_name).is_absolute()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peft_name), str(adapter))


def test_merge_reproduces_the_trained_model(trained, tmp_path):
    from cura.export import merge

    _, adapter, samples, logits = trained
    report = merge(None, adapter, tmp_path / "merged", log=QUIET)  # the base comes from the record
    assert report.max_abs_logit_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert max_diff(merged, samples, logits) < 1e-4  # against the trained model itself, not a rebuilt base


def test_gguf_export_reproduces_the_trained_model(trained, tmp_path):
    from cura.export import export_gguf

    _, adapter, samples, logits = trained
    report = export_gguf(
        None, tmp_path / "run.gguf", adapter=adapter, out_type="f32", verify=False, log=QUIET
    )
    back = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=str(report.output), dtype=torch.float32
    )
    # the merge's float32 summation order, twice (f32 rounds nothing)
    assert max_diff(back.eval(), samples, logits) < 2e-4


def test_generate_rebuilds_the_fp4_base(trained):
    from cura.generate import load_for_inference

    _, adapter, samples, logits = trained
    model, _ = load_for_inference(None, adapter, compute_dtype="float32", log=QUIET)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and {(m.quant_type, m._meta["blocksize"], m._meta["offset"]) for m in layers} == {
        ("fp4", 128, None)
    }
    assert max_diff(model, samples, logits) < 1e-5


def test_a_different_base_or_setting_is_refused_in_one_sentence(trained, tmp_path, smol_tokenizer, capsys):
    from cura.cli import main

    config, adapter, _, _ = trained
    other = save_tiny_base(tmp_path / "other", smol_tokenizer, seed=1)
    with pytest.raises(CuraError, match=f"trained on {config.model} but --model names {other}"):
        load_base_for_adapter(adapter, other, log=QUIET)
    with pytest.raises(CuraError, match=r"FP4, blocksize 128, no double quantization\) but a full-precision"):
        load_base_for_adapter(adapter, quantize=False, log=QUIET)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--model", str(other), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the adapter in") and err.count("\n") == 1
    # the recorded base under another spelling of its path is the same base
    same = Path(config.model).parent / "." / Path(config.model).name
    assert load_base_for_adapter(adapter, same, with_adapter=False, log=QUIET).spec.quant_type == "fp4"


def test_eval_compare_refuses_adapters_trained_on_different_bases(trained, tmp_path, smol_tokenizer):
    from cura.cli import main

    config, adapter, _, _ = trained
    model = AutoModelForCausalLM.from_pretrained(config.model)
    lora = LoraConfig(r=2, alpha=4.0)
    attach_lora(model, lora)
    nf4 = BaseSpec(source=config.model, compute_dtype="float32", chat_template=smol_tokenizer.chat_template)
    other = save_adapter(model, lora, tmp_path / "nf4-adapter", base=nf4)
    spec = BaseSpec.from_config(config)
    with pytest.raises(CuraError, match="NF4, blocksize 64, double quantization.*FP4, blocksize 128"):
        check_same_base(other, spec)
    data = Path(config.data.path)
    argv = ["eval", "--compare", "--adapter", str(adapter), "--adapter-b", str(other), "--data", str(data)]
    assert main([*argv, "--metrics", "loss", "--output", str(tmp_path / "report")]) == 2
    assert not (tmp_path / "report").exists()


def test_adapters_without_a_full_record_say_what_is_assumed(trained, tmp_path, smol_tokenizer):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config, _, _, _ = trained
    base = AutoModelForCausalLM.from_pretrained(config.model)
    peft_model = get_peft_model(base, PeftLoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    said: list[str] = []
    loaded = load_base_for_adapter(tmp_path / "peft", log=said.append)
    assert any("assuming NF4, blocksize 64, double quantization" in s for s in said)
    assert {m.quant_type for m in loaded.model.modules() if isinstance(m, Linear4bit)} == {"nf4"}
    # an adapter of an earlier cura (method and quant_type only): its FP4 is used, the rest assumed
    model = AutoModelForCausalLM.from_pretrained(config.model)
    lora = LoraConfig(r=2, alpha=4.0)
    attach_lora(model, lora)
    extra = {"method": "qlora", "quant_type": "fp4"}
    old = save_adapter(model, lora, tmp_path / "old", base_model_name_or_path=config.model, extra=extra)
    said.clear()
    loaded = load_base_for_adapter(old, log=said.append)
    assert any("assuming FP4, blocksize 64, double quantization" in s for s in said)
    assert {m.quant_type for m in loaded.model.modules() if isinstance(m, Linear4bit)} == {"fp4"}


def test_peft_base_path_of_a_gguf_source_opens_with_transformers(tmp_path, monkeypatch, smol_tokenizer):
    from cura.export import export_gguf
    from cura.models.base import peft_base_path

    monkeypatch.setenv("CURA_CACHE", str(tmp_path / "cache"))
    export_gguf(
        save_tiny_base(tmp_path / "base", smol_tokenizer),
        tmp_path / "t.gguf",
        out_type="f32",
        verify=False,
        log=QUIET,
    )
    path = peft_base_path(str(tmp_path / "t.gguf"))
    assert Path(path).is_relative_to(tmp_path / "cache")
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 2


def test_a_tampered_record_is_refused(smol_tokenizer):
    spec = BaseSpec(source="/models/x", chat_template=smol_tokenizer.chat_template)
    data = dict(spec.to_dict(), chat_template="{{ messages }}")
    with pytest.raises(CuraError, match="does not match its recorded sha256"):
        BaseSpec.from_dict(data)
    assert BaseSpec.from_dict(spec.to_dict()) == spec
