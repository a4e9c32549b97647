"""The 4-bit format against bitsandbytes 0.50.2 (CPU): code books, packed bytes, scales, state dicts."""

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState

from bnb_ref import dequantize_4bit as bnb_dequantize
from cura.quant import BLOCKSIZES, QuantizedTensor, code_4bit, dequantize, dynamic_map_signed, quantize
from cura.quant.blockwise import pack_nibbles, unpack_nibbles

NF4_LITERAL = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
FP4_LITERAL = [0, 0.0052083335, 0.6666667, 1.0, 0.33333334, 0.5, 0.16666667, 0.25]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((37, 29), (3,), (5, 300))  # odd numel, tiny, a short last block (1536x1024 below: exact blocks)


pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    """Run a test through the public functions on the CPU kernels (where they build) and on the PyTorch
    reference (``CURA_KERNELS=0``); tests/test_quant_kernels.py checks the two agree bit for bit."""
    if request.param == "reference":
        monkeypatch.setenv("CURA_KERNELS", "0")
    return request.param


def _bnb(w, quant_type, blocksize, double_quant):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def test_nf4_code_is_derived_and_pinned_to_the_literal_table():
    assert code_4bit("nf4").tolist() == torch.tensor(NF4_LITERAL, dtype=torch.float32).tolist()
    assert torch.equal(code_4bit("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))


def test_fp4_and_dynamic_maps_match_bitsandbytes():
    fp4 = torch.tensor(FP4_LITERAL + [-v for v in FP4_LITERAL], dtype=torch.float32)
    assert torch.equal(code_4bit("fp4"), fp4)
    assert torch.equal(code_4bit("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map_signed(), bnbf.create_dynamic_map(signed=True))


def _assert_near_ties(x_scaled, ours, theirs, code):
    """Where the 8-bit codes differ, both choices must be (almost) equally near the scaled value."""
    gap = ((x_scaled - code[ours.long()]).abs() - (x_scaled - code[theirs.long()]).abs()).abs()
    assert gap.max().item() <= 5e-5, gap.max().item()  # steps of the map are 3e-6 .. 0.014


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_scales_and_values_match_bitsandbytes(dtype, quant_type, double_quant):
    seed = DTYPES.index(dtype) * 100 + 10 * double_quant + (quant_type == "fp4")
    gen = torch.Generator().manual_seed(seed)
    mismatched = total = 0
    for blocksize in BLOCKSIZES:
        for shape in SHAPES:
            w = (torch.randn(*shape, generator=gen) * torch.rand(1, generator=gen) * 3).to(dtype)
            w.view(-1)[: min(blocksize, w.numel() // 2)] = 0  # an all-zero first block
            q = quantize(w, quant_type, blocksize, double_quant)
            packed, state = _bnb(w, quant_type, blocksize, double_quant)
            assert torch.equal(q.packed, packed), (blocksize, shape)
            assert q.shape == w.shape and q.dtype == dtype and q.blocksize == blocksize
            if not double_quant:
                assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, state.absmax)
                assert torch.equal(q.dequantize(), bnb_dequantize(packed, state))
                continue
            assert q.offset == state.offset.item()
            assert torch.equal(q.nested_absmax, state.state2.absmax)
            assert torch.equal(q.nested_code, state.state2.code)
            differ = q.absmax != state.absmax
            mismatched += int(differ.sum())
            total += differ.numel()
            if differ.any():  # what both 8-bit quantizers rounded: (absmax - offset) / nested absmax
                nested_block = torch.arange(q.absmax.numel()) // q.nested_blocksize
                x_scaled = (_float_absmax(w, blocksize) - q.offset) / q.nested_absmax[nested_block]
                _assert_near_ties(x_scaled[differ], q.absmax[differ], state.absmax[differ], q.nested_code)
            # bnb dequantizing our exact bytes gives our values bit for bit ...
            ours_in_bnb = _bnb_state(q.to_bnb_state_dict("w"), "w")
            assert torch.equal(q.dequantize(), bnb_dequantize(q.packed, ours_in_bnb))
            # ... and wherever the 8-bit scale codes agree, so do the values of the two quantizations.
            agree = (~differ).repeat_interleave(blocksize)[: w.numel()].view(w.shape)
            assert torch.equal(q.dequantize()[agree], bnb_dequantize(packed, state)[agree])
    if double_quant:
        assert mismatched <= max(8, 0.01 * total), (mismatched, total)  # bnb: ~0.2%, near ties


def _bnb_state(state_dict, prefix):
    """bitsandbytes' own reader of the quant-state entries (everything under `prefix` but the weight)."""
    parts = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    return QuantState.from_dict(parts, device="cpu")


def _float_absmax(w, blocksize):
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, blocksize).amax(1)


def test_dequantize_dtypes_and_function_form():
    w = torch.randn(64, 96)
    q = quantize(w)
    assert dequantize(q).dtype == torch.float32
    assert torch.equal(dequantize(q, torch.bfloat16), q.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_large_tensor_matches_bitsandbytes(double_quant, path):
    """Enough blocks to span several quantization chunks (and a realistic 8-bit mismatch rate)."""
    w = torch.randn(1536, 1024, generator=torch.Generator().manual_seed(7))
    q = quantize(w, blocksize=64, double_quant=double_quant)
    packed, state = _bnb(w, "nf4", 64, double_quant)
    assert torch.equal(q.packed, packed)
    if double_quant:
        differ = (q.absmax != state.absmax).float().mean().item()
        assert differ < 0.005, differ
    else:
        assert torch.equal(q.absmax, state.absmax)
        assert torch.equal(q.dequantize(), bnb_dequantize(packed, state))


def test_packing_layout_even_element_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_nibbles(codes, pad_code=7)
    assert packed.shape == (3, 1) and packed.flatten().tolist() == [0x12, 0xF0, 0x77]
    assert torch.equal(unpack_nibbles(packed, 5), codes)


def test_zero_tensor_and_ties(path):
    q = quantize(torch.zeros(130), double_quant=False)
    assert torch.all(q.packed == 0x77) and torch.equal(q.dequantize(), torch.zeros(130))
    assert q.absmax[:2].tolist() == [0.0, 0.0]
    code = code_4bit("nf4")
    tie = torch.tensor([1.0, (code[7] + code[8]).item() / 2] + [0.0] * 62)  # midpoint of codes 7 and 8
    assert unpack_nibbles(quantize(tie, double_quant=False).packed, 2).tolist() == [15, 7]


def test_nf4_error_on_standard_normal():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    mae = (quantize(w).dequantize() - w).abs().mean().item()
    assert 0.068 < mae < 0.078, mae  # QLoRA's NF4 at blocksize 64: ~0.073


def test_storage_bits_per_parameter():
    w = torch.randn(1024, 1024)
    tables = (16 + 256) * 4 + 4  # the two code books and the offset
    assert (quantize(w).nbytes - tables) * 8 / w.numel() == pytest.approx(4.127, abs=1e-3)
    assert (quantize(w, double_quant=False).nbytes - 16 * 4) * 8 / w.numel() == pytest.approx(4.5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(w=torch.arange(64)), "float32, bfloat16 and float16"),
        (dict(w=torch.randn(64), blocksize=48), "blocksize must be one of"),
        (dict(w=torch.randn(64), blocksize=8192), "blocksize must be one of"),
        (dict(w=torch.empty(0, 3)), "empty tensor"),
        (dict(w=torch.empty(64, device="meta")), "meta device"),
        (dict(w=torch.randn(64), quant_type="int4"), "quant_type must be"),
    ],
)
def test_bad_input_raises_one_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize(**bad)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_state_dict_round_trips_through_bitsandbytes(quant_type, double_quant):
    w = torch.randn(48, 80, dtype=torch.bfloat16)
    q = quantize(w, quant_type, 128, double_quant)
    sd = q.to_bnb_state_dict("layer.weight")
    packed, state = _bnb(w, quant_type, 128, double_quant)
    theirs = {"layer.weight": packed} | {
        f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()
    }
    # Same keys, in the same order, with the same dtypes and shapes as bitsandbytes writes.
    assert list(sd) == list(theirs)
    for key in sd:
        assert sd[key].dtype == theirs[key].dtype and sd[key].shape == theirs[key].shape, key
    assert json.loads(
        bytes(sd[f"layer.weight.quant_state.bitsandbytes__{quant_type}"].tolist())
    ) == json.loads(bytes(theirs[f"layer.weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    # cura -> bitsandbytes
    state_in_bnb = _bnb_state(sd, "layer.weight")
    assert torch.equal(bnb_dequantize(sd["layer.weight"], state_in_bnb), q.dequantize())
    # bitsandbytes -> cura
    back = QuantizedTensor.from_bnb_state_dict(theirs, "layer.weight")
    assert back.shape == w.shape and back.dtype == w.dtype and back.quant_type == quant_type
    assert torch.equal(back.dequantize(), bnb_dequantize(packed, state))


def test_from_bnb_state_dict_reports_missing_entries():
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit weight"):
        QuantizedTensor.from_bnb_state_dict({"x.weight": torch.zeros(3, dtype=torch.uint8)}, "x.weight")


def test_to_device_moves_without_requantizing():
    q = quantize(torch.randn(33, 17))
    moved = q.to("cpu")
    assert moved.packed is q.packed or torch.equal(moved.packed, q.packed)
    assert torch.equal(moved.dequantize(), q.dequantize()) and moved.nbytes == q.nbytes
    if torch.cuda.is_available():
        on_gpu = q.to("cuda")
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.dequantize().cpu(), q.dequantize())


@pytest.mark.parametrize("blocksize", [32, 4096])
def test_fast_dequantize_equals_plain_formula_on_every_tail_length(blocksize, path):
    """Each path (kernels; reference word table) vs ``code[unpacked] * absmax[block]``, sizes around edges."""
    for n in (1, 2, 3, 5, 6, 7, 63, 65, 66, 67, 4097, 70001, 131075):
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        q = quantize(w, blocksize=blocksize)
        plain = q.code[unpack_nibbles(q.packed, n).long()] * q.absmax_float().repeat_interleave(blocksize)[:n]
        assert torch.equal(q.dequantize(), plain), n
        buffer = torch.full((n,), float("nan"))
        assert q.dequantize(out=buffer).data_ptr() == buffer.data_ptr() and torch.equal(buffer, plain), n
    with pytest.raises(ValueError, match="out must be a contiguous float32, bfloat16 or float16 tensor of"):
        q.dequantize(out=torch.empty(3))
