"""cura.nn.select: one module-name rule, checked against PEFT's own matcher and PEFT's all-linear choice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cura.nn.select import ALL_LINEAR, matches, select

PATHS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    "names",
    [["q_proj"], ["proj"], ["self_attn.q_proj"], ["lm_head"], ["layers.1.mlp.down_proj"], ["model"], ["0"]],
)
def test_matches_is_peft_rule(names):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=names)
    for path in PATHS:
        assert matches(path, names) == bool(check_target_module_exists(config, path)), (path, names)


def test_examples_from_the_docstring():
    assert matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert matches("lm_head", ["lm_head"])
    assert not matches("model.layers.0.mlp.gate_proj", ["proj"])
    assert not matches("model.layers.0.mlp", ["model"])  # a prefix is not a suffix
    assert not matches("anything", [])


def test_select_targets_exclude_and_all_linear():
    assert select(PATHS, ["q_proj", "lm_head"], exclude=["lm_head"]) == [PATHS[0], PATHS[3]]
    assert select(PATHS, "q_proj") == [PATHS[0], PATHS[3]]  # one name, not a comma list
    assert select(PATHS, ALL_LINEAR, output_layer="lm_head") == PATHS[:-1]
    assert select(PATHS, ALL_LINEAR, exclude=["layers.1.mlp.down_proj"], output_layer="lm_head") == PATHS[:4]


def test_all_linear_matches_peft_on_a_tiny_model(make_tiny):
    from peft import LoraConfig, get_peft_model

    model = make_tiny("llama")
    linears = [name for name, m in model.named_modules() if type(m).__name__ == "Linear"]
    peft_model = get_peft_model(make_tiny("llama"), LoraConfig(target_modules="all-linear", r=2))
    prefix = "base_model.model."
    wrapped = [n[len(prefix) :] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n]
    assert select(linears, ALL_LINEAR, output_layer="lm_head") == wrapped


def test_select_is_torch_free():
    code = "import sys, cura.nn.select, cura.constants; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
