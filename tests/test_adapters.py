"""Adapters: config validation, targeting, the PEFT on-disk format both ways, merging, unwrapping."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cura.adapters import (
    LoraConfig,
    adapter_state_dict,
    attach_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    read_adapter_metadata,
    save_adapter,
    unwrap_lora,
)
from cura.errors import CuraError
from cura.nn.lora import LoRALinear
from tiny import tiny_model


def _randomize_lora(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lin in (layer.lora_A, layer.lora_B):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.1)


def _tokens() -> torch.Tensor:
    return torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits


def _trained_cura(arch="llama", **kw) -> tuple[nn.Module, LoraConfig]:
    config = LoraConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **kw})
    model = tiny_model(arch)
    attach_lora(model, config)
    _randomize_lora(model)
    return model, config


def _trained_peft(arch="llama", **kw):
    config = peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **kw}
    )
    model = peft.get_peft_model(tiny_model(arch), config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


# -- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"r": 0}, "lora.r"),
        ({"r": 2.5}, "lora.r"),
        ({"alpha": 0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"dropout": -0.1}, "lora.dropout"),
        ({"target_modules": []}, "lora.target_modules"),
        ({"target_modules": 5}, "lora.target_modules"),
        ({"exclude": [""]}, "lora.exclude"),
    ],
)
def test_bad_config_values_name_the_key(kwargs, key):
    with pytest.raises(CuraError, match=key.replace(".", r"\.")) as info:
        LoraConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_normalizes_target_lists():
    assert LoraConfig(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(exclude=["lm_head"]).exclude == ("lm_head",)
    assert (
        LoraConfig(r=16, alpha=32).scaling == 2.0
        and LoraConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0
    )


def test_config_reads_from_the_run_config_format():
    from cura.config import from_dict

    config = from_dict(LoraConfig, {"r": "8", "target_modules": "q_proj,v_proj", "exclude": "lm_head"})
    assert (config.r, config.target_modules, config.exclude) == (8, ["q_proj", "v_proj"], ("lm_head",))
    with pytest.raises(CuraError, match="lora.r"):
        from_dict(LoraConfig, {"r": -1})


# -- targeting -------------------------------------------------------------------------------------------------
def test_target_list_matches_peft_and_keeps_paths():
    model = tiny_model("mistral")
    targets = attach_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    twin = peft.get_peft_model(tiny_model("mistral"), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert set(targets) == {
        n.removeprefix("base_model.model.")
        for n, m in twin.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert targets[0] == "model.layers.0.self_attn.q_proj"
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj.base_layer"), nn.Linear)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in dict(model.named_parameters())


def test_exclude_and_lm_head():
    model = tiny_model("llama")
    targets = attach_lora(
        model, LoraConfig(exclude=("lm_head", "down_proj", "model.layers.0.self_attn.q_proj"))
    )
    assert "lm_head" not in targets and not any(t.endswith("down_proj") for t in targets)
    assert "model.layers.0.self_attn.q_proj" not in targets and "model.layers.1.self_attn.q_proj" in targets


def test_nothing_matched_lists_the_linears():
    with pytest.raises(CuraError, match=r"lora\.target_modules.*q_proj") as info:
        attach_lora(tiny_model("llama"), LoraConfig(target_modules=["qkv"]))
    assert "\n" not in str(info.value)


def test_attaching_twice_is_refused():
    model = tiny_model("llama")
    attach_lora(model, LoraConfig())
    with pytest.raises(CuraError, match="already has LoRA"):
        attach_lora(model, LoraConfig())


def test_unwrap_restores_the_base():
    model, base = tiny_model("qwen2"), tiny_model("qwen2")
    attach_lora(model, LoraConfig())
    _randomize_lora(model)
    unwrap_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(_logits(model), _logits(base))


# -- the PEFT format -------------------------------------------------------------------------------------------
def test_saved_adapter_loads_in_peft_with_identical_logits(tmp_path, arch):
    model, config = _trained_cura(arch)
    folder = save_adapter(model, config, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "cura_adapter.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary debris
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT must not complain about our config
        twin = peft.PeftModel.from_pretrained(tiny_model(arch), str(folder)).eval()
    assert torch.equal(_logits(model), _logits(twin))


def test_rslora_adapter_round_trips_through_peft(tmp_path):
    model, config = _trained_cura(
        "llama", r=8, alpha=4.0, use_rslora=True, target_modules=["q_proj", "o_proj"]
    )
    save_adapter(model, config, tmp_path / "a", base_model_name_or_path="tiny")
    twin = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "a")).eval()
    assert twin.peft_config["default"].use_rslora
    # rsLoRA's scale is not a power of two: add_update's addmm rounds scale * update once
    torch.testing.assert_close(_logits(model), _logits(twin), rtol=1e-6, atol=1e-6)


def test_peft_written_adapter_loads_into_cura(tmp_path, arch):
    twin = _trained_peft(arch)
    twin.save_pretrained(str(tmp_path / "peft"))
    model = tiny_model(arch)
    config = load_adapter(model, tmp_path / "peft")
    assert (config.r, config.alpha, config.use_rslora) == (4, 8.0, False)
    assert torch.equal(_logits(model), _logits(twin))
    assert not any(p.requires_grad for p in model.parameters())
    assert read_adapter_metadata(tmp_path / "peft") == {}


def test_peft_rslora_and_short_target_names_load(tmp_path):
    twin = _trained_peft("qwen2", r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj"])
    twin.save_pretrained(str(tmp_path / "peft"))
    model = tiny_model("qwen2")
    config = load_adapter(model, tmp_path / "peft", trainable=True)
    assert config.use_rslora and config.scaling == 16 / 8**0.5
    assert sorted(lora_layers(model)) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "mlp.up_proj")
    )
    # rsLoRA's scale is not a power of two: add_update's addmm rounds scale * update once
    torch.testing.assert_close(_logits(model), _logits(twin), rtol=1e-6, atol=1e-6)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_round_trip_into_a_model_that_already_has_adapters(tmp_path):
    """Resuming: attach with the run's config, then load the checkpoint's weights into those adapters."""
    model, config = _trained_cura("gemma")
    save_adapter(
        model,
        config,
        tmp_path / "ckpt",
        base_model_name_or_path="tiny",
        chat_template="{{ x }}",
        extra={"method": "qlora"},
    )
    fresh = tiny_model("gemma")
    attach_lora(fresh, config)
    loaded = load_adapter(fresh, tmp_path / "ckpt", trainable=True)
    assert loaded == config
    assert torch.equal(_logits(fresh), _logits(model))
    meta = read_adapter_metadata(tmp_path / "ckpt")
    assert meta["chat_template"] == "{{ x }}" and meta["method"] == "qlora" and meta["lora"]["r"] == 4


def test_save_into_an_existing_folder_keeps_other_files(tmp_path):
    model, config = _trained_cura()
    folder = tmp_path / "step-000010"
    folder.mkdir()
    save_adapter(model, config, folder, base_model_name_or_path="tiny")  # an empty folder is fine
    (folder / "trainer_state.json").write_text("{}")
    save_adapter(model, config, folder, base_model_name_or_path="tiny")  # overwrite in place
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "cura_adapter.json",
        "trainer_state.json",
    ]
    assert (folder / "trainer_state.json").read_text() == "{}"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved.keys() == adapter_state_dict(model).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["lora_alpha"] == 8.0


def test_load_errors_name_the_key_and_module(tmp_path):
    model, config = _trained_cura("llama")
    save_adapter(model, config, tmp_path / "a", base_model_name_or_path="tiny")
    with pytest.raises(CuraError, match="does not exist"):
        load_adapter(tiny_model("llama"), tmp_path / "missing")
    other = tiny_model("llama")
    attach_lora(other, LoraConfig(r=8))
    with pytest.raises(
        CuraError,
        match=r"lora_A\.weight' has shape \(4, \d+\) but module 'model\.layers\.0\.[a-z_.]+' needs \(8",
    ):
        load_adapter(other, tmp_path / "a")
    phi3 = tiny_model("phi3")  # fuses q/k/v and gate/up: the llama adapter's modules are not all there
    with pytest.raises(
        CuraError, match=r"key 'base_model\.model\.model\.layers\.0\.[a-z_.]+\.lora_A\.weight' names"
    ):
        load_adapter(phi3, tmp_path / "a")
    assert not lora_layers(phi3)  # nothing was changed
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CuraError, match=r"adapter_config\.json:1"):
        load_adapter(tiny_model("llama"), tmp_path / "a")


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(CuraError, match="attach_lora"):
        save_adapter(tiny_model("llama"), LoraConfig(), tmp_path / "a", base_model_name_or_path="tiny")


# -- merging ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_equals_peft_merge_and_unload(use_rslora):
    twin = _trained_peft("llama", use_rslora=use_rslora)
    adapter = {k.replace(".default", ""): v.clone() for k, v in twin.state_dict().items() if "lora_" in k}
    config = LoraConfig(r=4, alpha=8.0, use_rslora=use_rslora)
    base_sd = {k: v.clone() for k, v in tiny_model("llama").state_dict().items()}
    before = {k: v.clone() for k, v in base_sd.items()}
    merged = merge_lora(base_sd, adapter, config)
    reference = twin.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-7)
    assert all(torch.equal(before[k], base_sd[k]) for k in before)  # inputs untouched
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )


def test_merge_from_a_wrapped_model_gives_plain_names_and_same_logits():
    model, config = _trained_cura("qwen2")
    merged = merge_lora(model.state_dict(), adapter_state_dict(model), config)
    plain = tiny_model("qwen2", seed=5)
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-5, atol=1e-5)


def test_merge_rejects_a_mismatched_config():
    model, config = _trained_cura("llama")
    with pytest.raises(CuraError, match="lora.r=8"):
        merge_lora(tiny_model("llama").state_dict(), adapter_state_dict(model), LoraConfig(r=8))


def test_merge_refuses_quantized_base_weights():
    model, config = _trained_cura("llama")
    base = dict(tiny_model("llama").state_dict())
    base["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2048, 1, dtype=torch.uint8)
    with pytest.raises(CuraError, match="dequantize the model first"):
        merge_lora(base, adapter_state_dict(model), config)


def test_save_with_a_different_config_is_refused(tmp_path):
    model, config = _trained_cura("llama")
    with pytest.raises(CuraError, match=r"lora\.r=8"):
        save_adapter(model, LoraConfig(r=8), tmp_path / "a", base_model_name_or_path="tiny")
    assert not list(tmp_path.iterdir())


def test_save_refuses_a_folder_cura_did_not_write(tmp_path):
    """A PEFT adapter (or any files) in the folder without cura_adapter.json: refused, nothing touched."""
    model, config = _trained_cura()
    folder = tmp_path / "peft-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(CuraError, match="holds files cura did not write \\(no cura_adapter.json\\)"):
        save_adapter(model, config, folder, base_model_name_or_path="tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json"]
    assert (folder / "adapter_config.json").read_text() == '{"peft_type": "LORA"}'
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(CuraError, match="it is a file"):
        save_adapter(model, config, tmp_path / "a-file", base_model_name_or_path="tiny")
    assert (tmp_path / "a-file").read_text() == "mine"
