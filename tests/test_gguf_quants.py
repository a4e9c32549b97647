"""ggml's quantizers (cura.export.ggml_quants) against gguf-py's independent implementations, and the
per-tensor type choice of llama.cpp's quantize mixes."""

from __future__ import annotations

import numpy as np
import pytest

from cura.export import ggml_quants as gq
from cura.export.gguf import ggml_type, use_more_bits


def rows(seed: int = 0, shape=(16, 512)) -> np.ndarray:
    """Weight-like rows: normal values, a few outliers, an all-zero block and a constant block."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 256:] = 0.01
    x[3, 7] = 0.9
    return x


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_32_blocks_are_byte_identical_to_gguf_py(qtype):
    """gguf-py's numpy quantizers are written to be bit-exact with ggml-quants.c's reference ones."""
    import gguf

    x = rows()
    ours = gq.quantize(x, qtype)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype, worse", [("Q4_K", "Q4_0"), ("Q5_K", "Q5_0"), ("Q6_K", "Q5_K")])
def test_k_quants_decode_with_gguf_py_and_beat_the_simpler_type(qtype, worse):
    """gguf-py has no K-quant quantizer, but its dequantizer reads the layout independently: a wrong bit,
    nibble or scale position gives errors far above the type's; the K type must also beat the simpler
    block type of the same width (what the search over scales is for)."""
    x = rows(1)
    data = gq.quantize(x, qtype)
    assert data.shape == (16, 512 // 256 * gq.BYTES[qtype])
    back = gq.dequantize(data, qtype)

    def rel(y):
        return float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))

    assert rel(back) < rel(gq.dequantize(gq.quantize(x, worse), worse))
    assert rel(back) < {"Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.022}[qtype]
    assert np.array_equal(back[1, :256], np.zeros(256, np.float32))  # an all-zero block stays zero
    np.testing.assert_allclose(back[2, 256:], 0.01, rtol=0.02)  # a constant block keeps its value
    assert abs(back[3, 7] - 0.9) < 0.9 * {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}[qtype]


def test_make_qx_quants_finds_an_exact_grid():
    """Values on a grid l * s (l in [-32, 31], the largest magnitude at -32) are reproduced exactly."""
    rng = np.random.default_rng(2)
    levels = rng.integers(-31, 32, size=(4, 16)).astype(np.float32)
    levels[:, 3] = -32
    scale, codes = gq.make_qx_quants(levels * np.float32(0.25), 32)
    np.testing.assert_allclose(scale, 0.25, rtol=1e-6)
    assert np.array_equal(codes - 32, levels.astype(np.int32))


def test_use_more_bits_matches_llama_cpp_for_30_layers():
    # n/8 = 3, 7n/8 = 26: layers 0-2, 26-29, and every third from 5
    assert [i for i in range(30) if use_more_bits(i, 30)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        26,
        27,
        28,
        29,
    ]


def test_q4_k_m_mix_for_smollm2_shapes():
    """SmolLM2-135M: hidden 576 is not a multiple of 256, so its 576-wide rows fall back as llama.cpp's
    quantize does (Q4_K -> Q5_0, Q6_K -> Q8_0); ffn_down rows (1536) take K types."""

    def t(name, shape, out="q4_k_m"):
        return ggml_type(name, shape, out, 30, has_output=False)

    assert t("token_embd.weight", (49152, 576)) == "Q8_0"  # tied output: Q6_K, falling back
    assert t("blk.0.attn_q.weight", (576, 576)) == "Q5_0"
    assert t("blk.0.attn_v.weight", (192, 576)) == "Q8_0"  # more bits: Q6_K, falling back
    assert t("blk.3.attn_v.weight", (192, 576)) == "Q5_0"
    assert t("blk.0.ffn_down.weight", (576, 1536)) == "Q6_K"
    assert t("blk.3.ffn_down.weight", (576, 1536)) == "Q4_K"
    assert t("blk.3.ffn_down.weight", (576, 1536), "q5_k_m") == "Q5_K"
    assert t("blk.3.attn_q.weight", (576, 576), "q5_k_m") == "Q5_1"
    assert t("blk.3.attn_norm.weight", (576,)) == "F32"
    # a model whose rows fit (hidden 4096) and has its own output matrix
    assert ggml_type("output.weight", (32000, 4096), "q4_k_m", 32, True) == "Q6_K"
    assert ggml_type("token_embd.weight", (32000, 4096), "q4_k_m", 32, True) == "Q4_K"
    assert ggml_type("blk.4.attn_q.weight", (4096, 4096), "q4_0", 32, True) == "Q4_0"
    assert ggml_type("output.weight", (32000, 4096), "q4_0", 32, True) == "Q6_K"
    assert ggml_type("blk.4.attn_q.weight", (4096, 4096), "q6_k", 32, True) == "Q6_K"
    assert ggml_type("blk.4.attn_q.weight", (60, 60), "q8_0", 32, True) == "F16"
