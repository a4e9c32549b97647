"""`cura export gguf --adapter RUN/adapter --lora-only`: a llama.cpp LoRA adapter GGUF (as llama.cpp's
convert_lora_to_gguf.py writes it), checked for its metadata, names, shapes and row order, and run in
llama.cpp on the base's GGUF against PEFT's own merge of the adapter (transformers, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cura.adapters import LoraConfig, attach_lora, save_adapter
from cura.errors import CuraError
from cura.export.gguf import permute_qk
from cura.export.lora_gguf import export_lora_gguf
from cura.models.base import BaseSpec

R, ALPHA = 4, 8.0


def quiet(*_):
    pass


@pytest.fixture
def run(tmp_path, chat_tokenizer):
    """A tiny random Llama base folder and a non-zero LoRA adapter trained (recorded) on it unquantized."""
    from tiny import tiny_config

    config = tiny_config("llama")
    config.vocab_size = len(chat_tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(tmp_path / "base"))
    chat_tokenizer.save_pretrained(str(tmp_path / "base"))
    lora = LoraConfig(r=R, alpha=ALPHA)
    attach_lora(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # a trained adapter's B is not zero: make it change the answers
    spec = BaseSpec(
        source=str(tmp_path / "base"),
        method="lora",
        compute_dtype="float32",
        chat_template=chat_tokenizer.chat_template,
    )
    save_adapter(model, lora, tmp_path / "run" / "adapter", base=spec)
    return tmp_path


def test_lora_gguf_metadata_names_shapes_and_row_order(run):
    import gguf
    from safetensors.torch import load_file

    out = run / "lora.gguf"
    report = export_lora_gguf(run / "run" / "adapter", out, out_type="f32", verify=False, log=quiet)
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == ALPHA
    tensors = {t.name: t for t in reader.tensors}
    projections = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    expected = {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for p in projections for ab in "ab"}
    assert set(tensors) == expected and report.tensors == len(expected)
    # GGML order (ne): lora_a [in, r], lora_b [r, out], as llama-adapter.cpp requires
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [64, R]
    assert list(tensors["blk.0.attn_q.weight.lora_b"].shape) == [R, 64]
    assert list(tensors["blk.1.attn_k.weight.lora_b"].shape) == [R, 32]  # 2 kv heads x head_dim 16
    assert list(tensors["blk.0.ffn_down.weight.lora_a"].shape) == [128, R]
    saved = load_file(str(run / "run" / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}_proj.lora_{}.weight"

    def data(name, shape):
        return torch.from_numpy(np.array(tensors[name].data, dtype=np.float32).reshape(shape))

    b_q, b_k = saved[key.format("q", "B")], saved[key.format("k", "B")]
    # B's rows permuted as the base's q/k rows (B A's rows then match the permuted base weight); A as saved
    assert torch.equal(data("blk.1.attn_q.weight.lora_b", b_q.shape), permute_qk(b_q, 4))
    assert torch.equal(data("blk.1.attn_k.weight.lora_b", b_k.shape), permute_qk(b_k, 2))
    assert torch.equal(data("blk.1.attn_q.weight.lora_a", (R, 64)), saved[key.format("q", "A")])
    b_v = saved[key.format("v", "B")]
    assert torch.equal(data("blk.1.attn_v.weight.lora_b", b_v.shape), b_v)  # v is not permuted
    modelfile = (run / "lora.Modelfile").read_text()
    assert "\nFROM ./lora-base.gguf\nADAPTER ./lora.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    export_lora_gguf(
        run / "run" / "adapter", out, base_gguf="/models/b.gguf", overwrite=True, verify=False, log=quiet
    )
    assert "\nFROM /models/b.gguf\nADAPTER ./lora.gguf\n" in (run / "lora.Modelfile").read_text()


def test_lora_gguf_refuses_a_file_cura_did_not_write(run):
    out = run / "mine.gguf"
    out.write_bytes(b"not cura's")
    with pytest.raises(CuraError, match="not written by cura export"):
        export_lora_gguf(run / "run" / "adapter", out, verify=False, log=quiet)
    assert out.read_bytes() == b"not cura's"
    with pytest.raises(CuraError, match="--type must be one of f32, f16"):
        export_lora_gguf(run / "run" / "adapter", run / "q.gguf", out_type="q4_k_m", verify=False, log=quiet)


def test_lora_gguf_in_llamacpp_matches_peft_merge(run, chat_tokenizer):
    """llama.cpp on the base's f32 GGUF with the LoRA GGUF applied gives PEFT-merged transformers' log-probs
    (teacher-forced) and greedy tokens; without the adapter it does not (the adapter matters here)."""
    pytest.importorskip(
        "xllamacpp", reason="the llamacpp extra is not installed: pip install 'cura[llamacpp]'"
    )
    from peft import PeftModel

    from cura.export import export_gguf
    from cura.export.llamacpp import Server

    export_gguf(run / "base", run / "base.gguf", out_type="f32", verify=False, log=quiet)
    report = export_lora_gguf(
        run / "run" / "adapter", run / "lora.gguf", out_type="f32", verify=True, log=quiet
    )
    cpp = report.llamacpp  # the export's own verification (its f32 base written from the adapter's record)
    assert cpp["ids_identical"] and cpp["kept_rate"] == 1.0 and cpp["max_logprob_diff"] < 0.01

    base = AutoModelForCausalLM.from_pretrained(str(run / "base"), dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(base, str(run / "run" / "adapter")).merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(str(run / "base"), dtype=torch.float32).eval()
    ids = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there, how are you"}], add_generation_prompt=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].log_softmax(-1)
        unadapted = plain(torch.tensor([ids])).logits[0].log_softmax(-1)
    positions = range(len(ids) - 6, len(ids))
    targets = [ids[k] for k in positions]  # log p(ids[k] | ids[:k]), teacher-forced
    with_lora = Server(run / "base.gguf", n_ctx=256, lora=[run / "lora.gguf"], threads=1)
    try:
        got = [with_lora.logprob_of(ids[:k], t) for k, t in zip(positions, targets)]
        greedy, _, _ = with_lora.greedy(ids, 8)
    finally:
        with_lora.close()
    ref = [float(want[k - 1, t]) for k, t in zip(positions, targets)]
    off = [float(unadapted[k - 1, t]) for k, t in zip(positions, targets)]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-3
    assert max(abs(a - b) for a, b in zip(off, ref)) > 0.1  # the adapter changes the log-probs
    with torch.no_grad():
        hf = merged.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    assert greedy == hf[: len(greedy)] and len(greedy) > 0


def test_with_base_writes_the_base_as_trained_and_verifies_on_it(run):
    """--with-base: `<stem>-base.gguf` is the base the adapter was trained on; llama.cpp runs the LoRA GGUF
    on that very file (verified), and the Modelfile's FROM names it."""
    pytest.importorskip(
        "xllamacpp", reason="the llamacpp extra is not installed: pip install 'cura[llamacpp]'"
    )
    import gguf

    out = run / "ship" / "lora.gguf"
    report = export_lora_gguf(
        run / "run" / "adapter", out, out_type="f32", verify=True, with_base=True, log=quiet
    )
    base = run / "ship" / "lora-base.gguf"
    assert base.is_file() and report.llamacpp["kept_rate"] == 1.0
    assert report.llamacpp["max_logprob_diff"] < 0.01
    fields = gguf.GGUFReader(str(base)).fields
    assert "cura.exported_by" in fields and "adapter.type" not in fields  # a model, not an adapter
    assert "FROM ./lora-base.gguf" in (run / "ship" / "lora.Modelfile").read_text()
    assert sorted(p.name for p in (run / "ship").iterdir()) == [
        "lora-base.gguf",
        "lora.Modelfile",
        "lora.gguf",
        "lora.gguf.verify.json",
    ]
    (run / "mine").mkdir()
    (run / "mine" / "lora-base.gguf").write_bytes(b"a user's file")  # never replaced
    with pytest.raises(CuraError, match="was not written by cura export"):
        export_lora_gguf(run / "run" / "adapter", run / "mine" / "lora.gguf", with_base=True, log=quiet)
    assert sorted(p.name for p in (run / "mine").iterdir()) == ["lora-base.gguf"]
