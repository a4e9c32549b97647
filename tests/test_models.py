"""Model loading from every source, checked against transformers and bitsandbytes.

- quantize=False is exactly what transformers' `from_pretrained` gives (five families, single file,
  sharded, bfloat16);
- quantize=True equals transformers with each linear weight replaced by bitsandbytes' own NF4 + double
  quantization round trip (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`);
- cura's 4-bit checkpoints load in transformers + bitsandbytes and the other way round;
- loading is lean: peak RSS grows by far less than the float32 model;
- the bundled GGUF model converts once and loads from its cache afterwards (slow);
- a GGUF is read from its own path, never from a same-named file in the current folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bnb_ref import dequantize_4bit as bnb_dequantize
from bnb_ref import float_path
from cura.errors import CuraError
from cura.models import (
    LoadedModel,
    load_model,
    load_tokenizer,
    model_config,
    resolve_source,
    save_quantized,
)
from tiny import VOCAB, tiny_model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 320 ids ("w3" -> 3), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    return tok


def save_tiny(folder: Path, arch: str = "llama", seed: int = 0, **save_kwargs) -> Path:
    tiny_model(arch, seed=seed).save_pretrained(folder, **save_kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def bnb_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    return bnb_dequantize(packed, state)


def cura_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    from cura.quant import quantize

    return quantize(weight).dequantize(torch.float32)


def dequantized_reference(folder: Path, roundtrip, skip=("lm_head",)):
    """transformers' model with every linear weight but `skip` replaced by its NF4 + DQ round trip."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in skip:
            module.weight.data = roundtrip(module.weight.data)
    return model


def linear4bit_names(model) -> list[str]:
    from cura.nn.linear4bit import Linear4bit

    return [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]


# ---- full precision: exactly transformers ---------------------------------------------------------------


def test_full_precision_equals_transformers(tmp_path, arch):
    folder = save_tiny(tmp_path / arch, arch, seed=1)
    loaded = load_model(folder, quantize=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(loaded, LoadedModel) and loaded.kind == "hf" and loaded.source == str(folder)
    assert not loaded.model.training
    assert not any(t.is_meta for t in loaded.model.state_dict(keep_vars=True).values())
    assert torch.equal(logits(loaded.model, tokens()), logits(reference, tokens()))
    assert loaded.tokenizer.chat_template == tiny_tokenizer().chat_template


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    folder = save_tiny(tmp_path / "sharded", "mistral", seed=2, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(folder, quantize=False, compute_dtype=dtype)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        assert loaded.model.model.embed_tokens.weight.dtype == dtype
        assert torch.equal(logits(loaded.model, tokens()), logits(reference, tokens()))


def test_tied_embeddings_stay_tied(tmp_path):
    folder = save_tiny(tmp_path / "qwen2", "qwen2")
    for quantize in (False, True):
        loaded = load_model(folder, quantize=quantize)
        model = loaded.model
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # saved once, like transformers does: the tied lm_head is not written, and is re-tied on load
    from cura.models.checkpoint import read_header

    out = save_quantized(model, loaded.tokenizer, tmp_path / "q4")
    assert "lm_head.weight" not in read_header(out / "model.safetensors")
    again = load_model(out).model
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(logits(again, tokens()), logits(model, tokens()))


# ---- quantized: bitsandbytes' NF4 + DQ round trip -------------------------------------------------------


def test_quantized_equals_transformers_with_dequantized_weights(tmp_path, arch):
    folder = save_tiny(tmp_path / arch, arch, seed=3)
    model = load_model(folder).model
    linears = [n for n, m in tiny_model(arch).named_modules() if isinstance(m, nn.Linear)]
    assert sorted(linear4bit_names(model)) == sorted(n for n in linears if n != "lm_head")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = tokens()
    ours = logits(model, ids)
    # the loader: exactly transformers with each linear weight through cura's NF4 + DQ round trip
    torch.testing.assert_close(
        ours, logits(dequantized_reference(folder, cura_roundtrip), ids), rtol=1e-5, atol=1e-5
    )
    # the format, independently: bitsandbytes' round trip (its double-quant absmax codes differ by one at
    # near-ties, DESIGN.md), far closer than the full-precision model is
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    to_bnb = (ours - logits(dequantized_reference(folder, bnb_roundtrip), ids)).abs().max()
    to_full = (ours - logits(full, ids)).abs().max()
    assert to_bnb < 0.1 * to_full, (to_bnb, to_full)


def test_skip_keeps_named_linears_in_full_precision(tmp_path):
    folder = save_tiny(tmp_path / "llama", "llama")
    model = load_model(folder, skip=("lm_head", "o_proj", "down_proj")).model
    names = linear4bit_names(model)
    assert names and not any(n.endswith(("o_proj", "down_proj", "lm_head")) for n in names)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear


def test_skip_matches_as_quantize_model_and_peft_do(tmp_path):
    """One rule for skip lists (`cura.nn.select.matches`): whole dotted suffixes; a prefix such as
    "model.layers.0" is not a module name and skips nothing, whether the loader or `quantize_model` applies
    it (the loader used to read it as "everything under layer 0")."""
    from cura.nn.linear4bit import quantize_model

    folder = save_tiny(tmp_path / "llama", "llama")
    skip = ("lm_head", "layers.1.mlp.up_proj", "model.layers.0")
    loaded = linear4bit_names(load_model(folder, skip=skip).model)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert set(loaded) == set(quantize_model(plain, skip=skip))
    assert "model.layers.0.self_attn.q_proj" in loaded and "model.layers.1.mlp.up_proj" not in loaded


def test_bfloat16_compute_dtype(tmp_path):
    folder = save_tiny(tmp_path / "phi3", "phi3", seed=6)
    model = load_model(folder, compute_dtype=torch.bfloat16).model
    assert (
        model.model.embed_tokens.weight.dtype == torch.bfloat16
        and model.lm_head.weight.dtype == torch.bfloat16
    )
    assert model.model.layers[0].mlp.down_proj.compute_dtype == torch.bfloat16
    reference = dequantized_reference(folder, cura_roundtrip).to(torch.bfloat16)
    torch.testing.assert_close(logits(model, tokens()), logits(reference, tokens()), rtol=2e-2, atol=2e-2)


# ---- bitsandbytes checkpoints, both directions -----------------------------------------------------------


def test_saved_quantized_loads_in_transformers_bitsandbytes(tmp_path):
    folder = save_tiny(tmp_path / "src", "llama", seed=4)
    ours = load_model(folder)
    out = save_quantized(ours.model, ours.tokenizer, tmp_path / "q4")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] is True
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"] is True
    assert config["bnb_4bit_quant_storage"] == "uint8" and config["bnb_4bit_compute_dtype"] == "float32"
    assert not list(tmp_path.glob(".q4*")), "the temporary folder was left behind"
    from cura.models.checkpoint import read_header

    assert "lm_head.weight" in read_header(out / "model.safetensors")  # untied llama: its own lm_head

    theirs = float_path(AutoModelForCausalLM.from_pretrained(out).eval())
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(theirs, tokens()), logits(ours.model, tokens()), rtol=1e-5, atol=1e-5)
    # and cura reads its own checkpoint back as kind "bnb", bit for bit
    again = load_model(out)
    assert again.kind == "bnb"
    assert torch.equal(logits(again.model, tokens()), logits(ours.model, tokens()))


def test_bitsandbytes_checkpoint_loads_as_bnb(tmp_path):
    from transformers import BitsAndBytesConfig

    folder = save_tiny(tmp_path / "src", "qwen2", seed=5)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    theirs = float_path(
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config, dtype=torch.float32)
    )
    theirs.eval().save_pretrained(tmp_path / "bnb")
    tiny_tokenizer().save_pretrained(tmp_path / "bnb")

    assert resolve_source(tmp_path / "bnb") == ("bnb", tmp_path / "bnb")
    ours = load_model(tmp_path / "bnb")
    assert ours.kind == "bnb" and len(linear4bit_names(ours.model)) == 14
    torch.testing.assert_close(logits(ours.model, tokens()), logits(theirs, tokens()), rtol=1e-5, atol=1e-5)
    # quantize=False dequantizes: plain linears with the same numbers
    plain = load_model(tmp_path / "bnb", quantize=False).model
    assert not linear4bit_names(plain)
    torch.testing.assert_close(logits(plain, tokens()), logits(theirs, tokens()), rtol=1e-5, atol=1e-5)


# ---- lean loading ----------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from cura.models import load_model
    import cura.nn.linear4bit, cura.quant  # imports out of the measurement
    def peak_rss():  # VmHWM: this process's own high-water mark (ru_maxrss inherits the parent's at exec)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                                     num_attention_heads=2, vocab_size=64))
    before = peak_rss()
    loaded = load_model(sys.argv[1], quantize=sys.argv[2] == "4bit")
    print(peak_rss() - before)
    """
)


def test_quantized_load_is_lean(tmp_path):
    """A ~45M-parameter llama (178 MB in float32): loading it in 4 bits raises peak RSS by far less."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in skeleton.state_dict().items()}
    state.pop("lm_head.weight")
    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    folder = tmp_path / "big"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)

    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), "4bit"], capture_output=True, text=True, timeout=300,
        # a fixed mmap threshold: glibc otherwise raises it after each large free and may keep the freed
        # per-layer temporaries in a fragmented heap (seen: 55-245 MB here, run to run); this measures
        # what the loader holds, not the allocator's retention policy
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    growth = int(run.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {growth / 1e6:.0f} MB for a {fp32_bytes / 1e6:.0f} MB float32 model")
    assert fp32_bytes > 170e6
    assert growth < 0.5 * fp32_bytes, (
        f"peak RSS grew {growth / 1e6:.0f} MB for a {fp32_bytes / 1e6:.0f} MB model"
    )


# ---- sources and errors ---------------------------------------------------------------------------------


def test_source_errors_are_one_sentence(tmp_path):
    def error(source) -> str:
        with pytest.raises(CuraError) as info:
            load_model(source)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "does not exist" in error(tmp_path / "nope") and "smollm2-135m" in error("no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert ".gguf" in error(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error(tmp_path / "empty")
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text("{}")
    (pickle_only / "pytorch_model.bin").write_bytes(b"not loaded")
    message = error(pickle_only)
    assert "pickle" in message and "save_pretrained" in message
    (pickle_only / "pytorch_model.bin").unlink()
    assert "no model.safetensors" in error(pickle_only)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama",\n oops}')
    (broken / "model.safetensors").write_bytes(b"")
    assert "config.json:2" in error(broken)
    (broken / "config.json").write_text(
        '{"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}'
    )
    assert "'gptq'" in error(broken)


def test_missing_tokenizer_and_missing_tensor(tmp_path):
    folder = tmp_path / "notok"
    tiny_model("llama").save_pretrained(folder)
    with pytest.raises(CuraError, match="no tokenizer files"):
        load_model(folder)
    tiny_tokenizer().save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CuraError, match="model.norm.weight"):
        load_model(folder, quantize=False)


def test_tokenizer_and_config_without_weights(tmp_path):
    folder = save_tiny(tmp_path / "gemma", "gemma")
    assert load_tokenizer(folder).chat_template == tiny_tokenizer().chat_template
    config = model_config(folder)
    assert config.model_type == "gemma" and config.hidden_size == 64


# ---- the bundled real model (GGUF) ------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_converts_once_and_loads_from_cache(smollm2_gguf, smol_tokenizer, monkeypatch):
    from cura.models import gguf

    assert resolve_source("smollm2-135m") == ("bundled", smollm2_gguf)
    config = model_config("smollm2-135m")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    load_tokenizer("smollm2-135m")  # converts on first use (a fresh machine) or reads the cache
    cached = gguf.gguf_cache_folder(smollm2_gguf, "smollm2-135m") / "model.safetensors"
    written = cached.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(gguf, "convert_gguf", no_conversion)
    started = time.perf_counter()
    loaded = load_model("smollm2-135m")
    print(f"bundled model from the cache, quantized: {time.perf_counter() - started:.1f} s")
    assert cached.stat().st_mtime_ns == written, "the cache was rewritten"
    assert loaded.kind == "bundled" and len(linear4bit_names(loaded.model)) == 30 * 7
    assert loaded.tokenizer.chat_template == smol_tokenizer.chat_template
    assert loaded.model.config.architectures == ["LlamaForCausalLM"]

    # the float32 copy is exactly what transformers reads from the cache folder, and both models know Paris
    prompt = smol_tokenizer("The capital of France is", return_tensors="pt").input_ids
    full = load_model("smollm2-135m", quantize=False).model
    reference = AutoModelForCausalLM.from_pretrained(cached.parent, dtype=torch.float32).eval()
    assert torch.equal(logits(full, prompt), logits(reference, prompt))
    paris = smol_tokenizer(" Paris").input_ids[0]
    assert logits(full, prompt)[0, -1].argmax() == paris
    assert logits(loaded.model, prompt)[0, -1].argmax() == paris


@pytest.mark.slow
def test_user_gguf_file_is_a_gguf_source(tmp_path, monkeypatch, smollm2_gguf):
    monkeypatch.setenv("CURA_CACHE", str(tmp_path / "cache"))
    link = tmp_path / "my-model.gguf"
    link.symlink_to(smollm2_gguf)
    assert resolve_source(link) == ("gguf", link)
    assert model_config(link).num_hidden_layers == 30  # from the GGUF metadata, without converting
    assert not (tmp_path / "cache").exists()


def test_a_gguf_source_is_read_from_its_own_path(tmp_path, monkeypatch, smol_tokenizer):
    """transformers reads a bare `gguf_file` name relative to the current folder when such a file is there:
    loading models/model.gguf next to another ./model.gguf must still convert models/model.gguf."""
    from cura.export import export_gguf
    from tiny import tiny_config

    monkeypatch.setenv("CURA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    models = {}
    for seed, path in ((1, Path("model.gguf")), (0, tmp_path / "models" / "model.gguf")):
        config = tiny_config("llama")
        config.vocab_size = len(smol_tokenizer)
        torch.manual_seed(seed)
        models[seed] = AutoModelForCausalLM.from_config(config).eval()
        models[seed].save_pretrained(tmp_path / f"hf{seed}")
        smol_tokenizer.save_pretrained(tmp_path / f"hf{seed}")
        export_gguf(
            tmp_path / f"hf{seed}", path, out_type="f32", check=False, verify=False, log=lambda *_: None
        )
    loaded = load_model(tmp_path / "models" / "model.gguf", quantize=False).model
    key = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(loaded.state_dict()[key], models[0].state_dict()[key], rtol=0, atol=0)
