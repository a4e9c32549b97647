"""Merge (vs PEFT's merge_and_unload on the same dequantized base), GGUF export (read back by transformers'
GGUF loader), the Ollama Modelfile, and the chat-template check."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cura.adapters import LoraConfig, attach_lora, lora_layers, save_adapter
from cura.errors import CuraError
from cura.export import (
    check_template,
    detect_style,
    export_gguf,
    merge,
    modelfile_text,
    permute_qk,
    verify_merge,
)
from cura.export.template import STYLES
from tiny import tiny_config

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set system = none %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system = message['content'] %}"
    "{% elif message['role'] == 'user' %}{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ '[INST] ' + messages[0]['content'] + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def TRAINED_TEMPLATE(tokenizer):  # noqa: N802
    return tokenizer.chat_template + "{# trained with cura #}"


def save_base(folder, arch, tokenizer, seed=0):
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model


def save_random_adapter(model, folder, chat_template, seed=1, r=4):
    """An adapter with non-zero B (so merging is not the identity), saved as training would save it."""
    model = copy.deepcopy(model)
    config = LoraConfig(r=r, alpha=8.0)
    attach_lora(model, config)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(
        model,
        config,
        folder,
        base_model_name_or_path="tiny",
        chat_template=chat_template,
        extra={"method": "qlora", "quant_type": "nf4"},
    )
    return folder


def make_run(root, arch, tokenizer):
    """(base folder, adapter folder, plain base model) for a tiny model with the tiny ChatML tokenizer."""
    model = save_base(root / "base", arch, tokenizer)
    # trained with a template that differs from the base tokenizer's: merge must ship the adapter's
    adapter = save_random_adapter(model, root / "adapter", TRAINED_TEMPLATE(tokenizer))
    return root / "base", adapter, model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_run(request, tmp_path_factory, chat_tokenizer):
    return make_run(tmp_path_factory.mktemp(f"export-{request.param}"), request.param, chat_tokenizer)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, chat_tokenizer):
    return make_run(tmp_path_factory.mktemp("export-llama"), "llama", chat_tokenizer)


def test_permute_qk_is_undone_by_transformers_gguf_loader():
    """llama.cpp's q/k row permutation, reversed by transformers' own (independent) implementation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    torch.manual_seed(0)
    undo = LlamaTensorProcessor()._reverse_permute_weights
    for n_head, n_kv in ((4, 4), (4, 2), (9, 3)):
        w = torch.randn(n_kv * 16, 32)
        permuted = permute_qk(w, n_head, n_kv)
        assert not torch.equal(permuted, w)
        assert np.array_equal(undo(permuted.numpy(), n_head, n_kv), w.numpy())
    # row pair (2i, 2i+1) of a head holds HF rows (i, i + head_dim/2)
    w = torch.arange(8.0).reshape(8, 1)
    assert permute_qk(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_merge_matches_peft_on_dequantized_base(tiny_run, tmp_path, chat_tokenizer):
    from peft import PeftModel

    from cura.models import load_model
    from cura.nn.linear4bit import dequantize_model

    base, adapter, plain = tiny_run
    report = merge(base, adapter, tmp_path / "merged", log=lambda *_: None)
    assert report.merged_modules == 14 and report.max_abs_logit_diff < 1e-4
    assert len(report.warnings) == 1 and "different chat template" in report.warnings[0]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))

    # independent: PEFT merges the same adapter into the same dequantized NF4 base
    deq = dequantize_model(load_model(base, quantize=True).model)
    deq_state = {k: v.clone() for k, v in deq.state_dict().items()}
    expected = PeftModel.from_pretrained(deq, str(adapter)).merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[key], deq_state[key], atol=1e-3)  # the adapter did something

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == [type(plain).__name__] and "quantization_config" not in config
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert type(reloaded) is type(plain)
    # merging into the original (not dequantized) weights would be a different model
    assert not torch.allclose(deq_state[key], plain.state_dict()[key], atol=1e-4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert tok.chat_template == TRAINED_TEMPLATE(chat_tokenizer)


def test_merge_dtype_and_cli(llama_run, tmp_path, capsys):
    from cura.cli import merge as merge_cli

    base, adapter, _ = llama_run
    parser = argparse.ArgumentParser()
    merge_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "merge",
            "--model",
            str(base),
            "--adapter",
            str(adapter),
            "--output",
            str(tmp_path / "m"),
            "--dtype",
            "bfloat16",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "perplexity" in out
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_merge_check_fails_loudly_on_a_corrupted_weight(llama_run, tmp_path):
    base, adapter, _ = llama_run
    out = merge(base, adapter, tmp_path / "merged", log=lambda *_: None).output
    path = out / "model.safetensors"
    weights = load_file(str(path))
    weights["model.layers.1.mlp.down_proj.weight"][0, :] += 0.5
    save_file(weights, str(path), metadata={"format": "pt"})
    with pytest.raises(CuraError, match="differ from the adapter on its base"):
        verify_merge(base, adapter, out, log=lambda *_: None)


def test_merge_quantize_4bit_writes_a_bnb_folder(llama_run, tmp_path):
    """The 4-bit folder holds exactly the bytes of quantizing the float32 merge with cura.quant (the adapter
    records no base, so the defaults: NF4, blocksize 64, double quantization)."""
    from cura.models import load_model, resolve_source
    from cura.quant import quantize

    base, adapter, _ = llama_run
    merge(base, adapter, tmp_path / "f", log=lambda *_: None)
    merge(base, adapter, tmp_path / "q", quantize_4bit=True, log=lambda *_: None)
    assert resolve_source(tmp_path / "q")[0] == "bnb"
    floats, quantized = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("f", "q"))
    linears = [k for k in floats if k.endswith("_proj.weight")]
    assert len(linears) == 14
    for key in linears:
        expected = quantize(floats[key])
        assert torch.equal(quantized[key].flatten(), expected.packed.flatten()), key
        assert torch.equal(quantized[f"{key}.absmax"], expected.absmax), key
    assert torch.equal(quantized["model.norm.weight"], floats["model.norm.weight"])
    assert load_model(tmp_path / "q").model is not None
    record = json.loads((tmp_path / "q" / "cura_merge.json").read_text())
    assert record["dtype"] == "bitsandbytes 4-bit" and record["base"]["blocksize"] == 64


def test_merge_never_replaces_a_folder_it_did_not_write(llama_run, tmp_path):
    base, adapter, _ = llama_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"quantize_4bit": True, "overwrite": True}):
        with pytest.raises(CuraError, match="cura did not write there .no cura_merge.json."):
            merge(base, adapter, out, log=lambda *_: None, **flags)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder is fine, and a cura merge output may be replaced
    merge(base, adapter, out, log=lambda *_: None)
    with pytest.raises(CuraError, match="pass --overwrite to replace it"):
        merge(base, adapter, out, dtype="bfloat16", log=lambda *_: None)
    merge(base, adapter, out, dtype="bfloat16", overwrite=True, log=lambda *_: None)
    assert json.loads((out / "cura_merge.json").read_text())["dtype"] == "bfloat16"
    (out / "mine.txt").write_text("added by the user")  # a user's file in a merge output is never deleted
    with pytest.raises(CuraError, match="holds files cura did not write there .mine.txt."):
        merge(base, adapter, out, overwrite=True, log=lambda *_: None)
    assert (out / "mine.txt").read_text() == "added by the user"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_merge_into_the_current_folder_or_a_file_is_one_sentence(llama_run, tmp_path, monkeypatch):
    base, adapter, _ = llama_run
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for output in (".", str(tmp_path)):
        with pytest.raises(CuraError, match="is the current folder .or holds it.; .* --output ./merged"):
            merge(base, adapter, output, log=lambda *_: None)
    (tmp_path / "file.bin").write_bytes(b"user data")
    with pytest.raises(CuraError, match="is a file"):
        merge(base, adapter, tmp_path / "file.bin", log=lambda *_: None)
    assert (tmp_path / "file.bin").read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "here"] and not any(here.iterdir())


def test_export_never_replaces_a_file_it_did_not_write(tmp_path, chat_tokenizer):
    save_base(tmp_path / "base", "llama", chat_tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.Modelfile").write_text("FROM mine\n")
    (out / "other.gguf").write_bytes(b"user bytes")
    quiet = dict(check=False, verify=False, log=lambda *_: None)
    for name in ("other.gguf", "model.gguf"):  # the .gguf, or the Modelfile beside it
        with pytest.raises(CuraError, match="was not written by cura export"):
            export_gguf(tmp_path / "base", out / name, overwrite=True, **quiet)
    assert (out / "other.gguf").read_bytes() == b"user bytes"
    assert (out / "model.Modelfile").read_text() == "FROM mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["model.Modelfile", "other.gguf"]
    export_gguf(tmp_path / "base", tmp_path / "new" / "tiny.gguf", **quiet)
    with pytest.raises(CuraError, match="pass --overwrite to replace it"):
        export_gguf(tmp_path / "base", tmp_path / "new" / "tiny.gguf", **quiet)
    export_gguf(tmp_path / "base", tmp_path / "new" / "tiny.gguf", overwrite=True, **quiet)


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_round_trip_tiny_llama(out_type, tmp_path_factory, chat_tokenizer):
    import gguf

    from cura.export.gguf import WRITER_TOLERANCE

    root = tmp_path_factory.mktemp(f"gguf-{out_type}")
    save_base(root / "base", "llama", chat_tokenizer)
    out = root / "out" / "tiny.gguf"
    report = export_gguf(root / "base", out, out_type=out_type, verify=False, log=lambda *_: None)
    assert report.tokenizer_roundtrip
    # the source rounded exactly as written vs the file read back: only summation order differs
    assert report.max_abs_logit_diff <= min(WRITER_TOLERANCE, 1e-4)
    assert report.rounding["positions"] > 0 and report.rounding["top1"] > 0.5
    reader = gguf.GGUFReader(str(report.output))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 64 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.vocab_size"] == len(chat_tokenizer) and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"] == chat_tokenizer.chat_template
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the tiny tokenizer splits as GPT-2 (SmolLM's: below)
    assert fields["tokenizer.ggml.eot_token_id"] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_norm.weight"] == "F32"
    expected = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[out_type]
    assert names["blk.1.ffn_down.weight"] == expected
    assert (root / "out" / "tiny.Modelfile").read_text().startswith("FROM ./tiny.gguf\n")
    saved = json.loads((root / "out" / "tiny.gguf.verify.json").read_text())
    assert saved["out_type"] == out_type and saved["max_abs_logit_diff"] == report.max_abs_logit_diff
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "tiny.Modelfile",
        "tiny.gguf",
        "tiny.gguf.verify.json",
    ]


def test_gguf_check_catches_a_writer_bug_and_leaves_nothing(tmp_path, monkeypatch, chat_tokenizer):
    """With q/k written in transformers' row order (the rotary permutation forgotten), the file read back
    is another model: the check says so, and no .gguf, Modelfile or temporary is left."""
    import cura.export.gguf as G

    save_base(tmp_path / "base", "llama", chat_tokenizer)
    monkeypatch.setattr(G, "permute_qk", lambda w, *_: w)
    out = tmp_path / "out" / "bad.gguf"
    with pytest.raises(CuraError, match="a tensor was written wrong"):
        export_gguf(tmp_path / "base", out, out_type="f16", verify=False, log=lambda *_: None)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_one_modelfile_per_export(tmp_path, chat_tokenizer):
    save_base(tmp_path / "base", "llama", chat_tokenizer)
    for t in ("f16", "q8_0"):
        export_gguf(
            tmp_path / "base", tmp_path / f"m-{t}.gguf", out_type=t, verify=False, log=lambda *_: None
        )
    assert (tmp_path / "m-f16.Modelfile").read_text().startswith("FROM ./m-f16.gguf\n")
    assert (tmp_path / "m-q8_0.Modelfile").read_text().startswith("FROM ./m-q8_0.gguf\n")


def random_adapter_for(config, folder, chat_template, r=2, seed=1):
    """A random non-zero adapter for a model config, built on the meta device (no weights loaded)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=r, alpha=2.0 * r)
    attach_lora(model, lora)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        for linear in (layer.lora_A, layer.lora_B):
            linear.weight = torch.nn.Parameter(torch.randn(linear.weight.shape) * 0.02)
    extra = {"method": "qlora", "quant_type": "nf4"}
    return save_adapter(
        model, lora, folder, base_model_name_or_path="smollm2-135m", chat_template=chat_template, extra=extra
    )


@pytest.mark.slow
def test_bundled_model_with_adapter_to_gguf_f16(tmp_path, smol_tokenizer):
    import gguf

    from cura.models import model_config

    adapter = random_adapter_for(
        model_config("smollm2-135m"), tmp_path / "adapter", smol_tokenizer.chat_template
    )
    report = export_gguf("smollm2-135m", tmp_path / "smol.gguf", adapter=adapter, verify=False, log=print)
    assert report.tokenizer_roundtrip and report.max_abs_logit_diff < report.tolerance
    assert report.rounding["top1"] >= 0.95  # f16 rounding of a random adapter's merge changes little
    assert report.tensors == 272 and report.architecture == "llama"
    pre = gguf.GGUFReader(str(report.output)).fields["tokenizer.ggml.pre"].contents()
    assert pre == "smollm"  # as in the bundled GGUF llama.cpp wrote
    assert "SmolLM" in (tmp_path / "smol.Modelfile").read_text()


def test_detect_style_and_modelfile_for_chatml(smol_tokenizer):
    info = detect_style(smol_tokenizer, smol_tokenizer.chat_template)
    assert info.style is STYLES["chatml"]
    assert info.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text, warning = modelfile_text("m.gguf", smol_tokenizer, smol_tokenizer.chat_template)
    assert warning is None
    assert f'SYSTEM """{info.default_system}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("name,template", [("llama3", LLAMA3_TEMPLATE), ("mistral", MISTRAL_TEMPLATE)])
def test_styles_render_like_their_jinja_templates(name, template, chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.bos_token, tok.eos_token = STYLES[name].bos, STYLES[name].assistant_suffix or tok.eos_token
    info = detect_style(tok, template)
    assert info.style is STYLES[name] and info.default_system is None
    for convo in CONVERSATIONS:
        jinja = tok.apply_chat_template(
            convo, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert info.style.render(convo) == jinja
    text, warning = modelfile_text("m.gguf", tok, template)
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    style = info.style
    assert style.user_prefix + ("{{ if $system }}" if style.system_in_user else "{{ .Content }}") in go
    assert style.assistant_prefix + "{{ .Content }}" + style.assistant_suffix in go
    # the generation prompt only after a turn that is not the assistant's; llama.cpp adds BOS itself
    assert go.endswith('{{ if ne $last "assistant" }}' + style.assistant_prefix + "{{ end }}")
    assert style.bos not in go
    for stop in style.stops:
        assert f'PARAMETER stop "{stop}"' in text


def test_unknown_template_says_to_write_it_by_hand(chat_tokenizer):
    template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    text, warning = modelfile_text("m.gguf", chat_tokenizer, template)
    assert 'TEMPLATE """' not in text and "write one by hand" in warning


def test_check_template(tmp_path, chat_tokenizer):
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    trained = save_random_adapter(model, tmp_path / "a", chat_tokenizer.chat_template)
    assert check_template(trained, chat_tokenizer) is None
    other = copy.deepcopy(chat_tokenizer)
    other.chat_template = LLAMA3_TEMPLATE
    warning = check_template(trained, other)
    assert "different chat template" in warning and "cura_adapter.json" in warning
    untemplated = save_random_adapter(model, tmp_path / "b", None)
    assert check_template(untemplated, other) is None


def test_gguf_tensor_names_per_architecture():
    """llama.cpp's names; q/k permuted for llama and mistral (written as llama), not for qwen2 (NEOX rope).
    (Read-back of qwen2 and mistral files is the same code path as the llama round trip above.)"""
    from cura.export.gguf import gguf_architecture, gguf_tensors

    for arch, expected in (
        ("llama", ("llama", True)),
        ("mistral", ("llama", True)),
        ("qwen2", ("qwen2", False)),
    ):
        model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
        assert gguf_architecture(model.config) == expected
        tensors = {name: data for name, data, _ in gguf_tensors(model, *expected)}
        q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
        k = model.state_dict()["model.layers.1.self_attn.k_proj.weight"]
        if expected[1]:
            assert np.array_equal(tensors["blk.1.attn_q.weight"], permute_qk(q, 4, 4).numpy())
            assert np.array_equal(tensors["blk.1.attn_k.weight"], permute_qk(k, 4, 2).numpy())
        else:
            assert np.array_equal(tensors["blk.1.attn_q.weight"], q.numpy())
            assert "blk.1.attn_q.bias" in tensors and "output.weight" not in tensors  # tied embeddings
        assert {
            "token_embd.weight",
            "output_norm.weight",
            "blk.0.ffn_gate.weight",
            "blk.0.attn_output.weight",
        } <= set(tensors)
    with pytest.raises(CuraError, match="exports GGUF for"):
        gguf_architecture(tiny_config("phi3"))


def test_export_cli_parses_and_refuses_a_bad_output_name(tmp_path):
    from cura.cli import export as export_cli

    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["export", "gguf", "--model", str(tmp_path), "--output", str(tmp_path / "m.bin")]
    )
    assert (args.out_type, args.adapter, args.no_check) == ("f16", None, False)
    with pytest.raises(CuraError, match=r"must end in \.gguf"):
        args.func(args)
    assert (
        parser.parse_args(["export", "gguf", "--output", "m.gguf", "--type", "q4_k_m"]).out_type == "q4_k_m"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "gguf", "--output", "m.gguf", "--type", "q3_k"])


def test_gguf_check_reads_the_file_it_wrote_whatever_its_name(tmp_path, monkeypatch, chat_tokenizer):
    """transformers takes a bare `gguf_file` name relative to the current folder when a file of that name
    is there: `--output out/model.gguf` next to an earlier ./model.gguf (the README's export) was checked
    against the other file's weights. The same export under two names must pass the same check."""
    monkeypatch.chdir(tmp_path)
    save_base(tmp_path / "other", "llama", chat_tokenizer, seed=1)
    export_gguf(
        tmp_path / "other", "model.gguf", out_type="f32", check=False, verify=False, log=lambda *_: None
    )
    save_base(tmp_path / "base", "llama", chat_tokenizer, seed=0)
    diffs = {}
    for name in ("smol.gguf", "model.gguf"):
        report = export_gguf(
            tmp_path / "base", tmp_path / "out" / name, out_type="f32", verify=False, log=lambda *_: None
        )
        diffs[name] = report.max_abs_logit_diff
    assert diffs["model.gguf"] == diffs["smol.gguf"] <= 1e-5


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral"])
def test_modelfile_template_renders_in_go_like_the_jinja_template(name, tmp_path, chat_tokenizer):
    """Go's text/template (what Ollama runs) on the Modelfile's TEMPLATE equals the Jinja template for a
    single turn, a system prompt, several turns, and a conversation ending in an assistant turn (no
    generation prompt after it, as Jinja without add_generation_prompt). BOS is llama.cpp's to add."""
    import shutil
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("no `go` on this machine to run text/template (the Modelfile's TEMPLATE language)")
    style = STYLES[name]
    template = {
        "chatml": chat_tokenizer.chat_template,
        "llama3": LLAMA3_TEMPLATE,
        "mistral": MISTRAL_TEMPLATE,
    }
    tok = copy.deepcopy(chat_tokenizer)
    tok.bos_token, tok.eos_token = style.bos, style.assistant_suffix or tok.eos_token
    (tmp_path / "render.go").write_text(GO_RENDER)
    go = style.go_template()
    convos = [*CONVERSATIONS, CONVERSATIONS[1][:3]]
    for convo in convos:
        final_assistant = convo[-1]["role"] == "assistant"
        jinja = tok.apply_chat_template(
            convo, chat_template=template[name], tokenize=False, add_generation_prompt=not final_assistant
        )
        proc = subprocess.run(
            ["go", "run", str(tmp_path / "render.go")],
            input=json.dumps(
                {"Template": go, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in convo]}
            ),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert style.bos + proc.stdout == jinja, convo


def test_modelfile_strings_are_literal():
    """Ollama does no escape processing in quoted strings: a backslash stays, a quote needs triple quotes."""
    from cura.export.template import quote

    assert quote("<|im_end|>") == '"<|im_end|>"'
    assert quote("a\\nb") == '"a\\nb"'  # the two characters backslash and n, not a line break
    assert quote('say "hi" twice') == '"""say "hi" twice"""'
    assert quote("two\nlines") == '"""two\nlines"""'
    with pytest.raises(CuraError, match="cannot hold"):
        quote('x """ y')
    with pytest.raises(CuraError, match="cannot hold"):
        quote('ends in "')
