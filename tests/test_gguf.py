"""GGUF weights: the torch dequantisers against gguf-py's numpy reference, GGUFLinear, and file round trips."""

import struct

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rectiflux.quantize.gguf as gguf_module
from rectiflux.quantize.gguf import (
    BLOCKS,
    F16_FIELDS,
    GGMLType,
    GGUFLinear,
    byte_shape,
    check_size,
    dequantize,
    quantize_to_raw,
    read_gguf,
    write_gguf,
)
from rectiflux.weights.checkpoint import CheckpointError

T = GGMLType
FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
SHAPES = [(4, 256), (3, 512), (2, 3, 256)]


def random_raw(qtype, shape, seed=0, scale=1.0):
    """Random bytes for a `shape` tensor of `qtype`, with every float field finite: (rows..., bytes per row)."""
    g = torch.Generator().manual_seed(seed)
    rows = byte_shape(shape, qtype)
    if qtype in FLOATS:
        values = (torch.randn(shape, generator=g) * scale).to(FLOATS[qtype])
        return values.view(torch.uint8).reshape(rows)
    block_size, type_size = BLOCKS[qtype]
    blocks = torch.randint(0, 256, (int(np.prod(shape)) // block_size, type_size), generator=g, dtype=torch.uint8)
    for offset in F16_FIELDS[qtype]:
        d = (torch.randn(blocks.shape[0], generator=g) * scale).half()
        blocks[:, offset:offset + 2] = d.view(torch.uint8).reshape(-1, 2)
    return blocks.reshape(rows)


def reference(raw, qtype):
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(qtype))))


def test_every_type_has_a_dequantizer_and_gguf_sizes():
    for qtype, size in BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)] == size
        assert gguf.GGMLQuantizationType(qtype).name == qtype.name
    assert set(F16_FIELDS) | set(FLOATS) == set(BLOCKS)


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    for seed, shape in enumerate(SHAPES):
        raw = random_raw(qtype, shape, seed)
        ours = dequantize(raw, qtype, shape)
        ref = reference(raw, qtype).reshape(shape)
        assert ours.shape == shape and ours.dtype == torch.float32
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # the same bits, signed zeros included
        assert torch.equal(dequantize(raw.reshape(-1), qtype, shape, torch.bfloat16), ref.to(torch.bfloat16))


def test_dequantize_refuses_unsupported_types_and_sizes():
    raw = torch.zeros(66, dtype=torch.uint8)
    with pytest.raises(ValueError, match="GGUF tensor type IQ2_XS is not supported; supported: F32") as e:
        dequantize(raw, int(T.IQ2_XS), (1, 256))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="type #99 is not supported"):
        dequantize(raw, 99, (1, 256))
    with pytest.raises(ValueError, match="Q8_0 tensor of shape \\(1, 64\\) takes 68 bytes, got 66"):
        dequantize(raw, T.Q8_0, (1, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        check_size(raw, T.Q8_0, (2, 33))
    with pytest.raises(ValueError, match="uint8"):
        check_size(raw.float(), T.Q8_0, (1, 64))
    with pytest.raises(ValueError, match="IQ4_XS is not supported"):
        GGUFLinear(256, 4, T.IQ4_XS)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_gguf_linear(qtype, monkeypatch):
    raw = random_raw(qtype, (8, 256), seed=1, scale=0.01)
    bias = torch.randn(8)
    layer = GGUFLinear.from_raw(raw, qtype, (8, 256), bias=bias)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == byte_shape((8, 256), qtype)
    assert layer.weight.data_ptr() == raw.data_ptr()  # the raw bytes are kept, not copied
    assert not layer.bias.requires_grad and qtype.name in repr(layer)
    weight = reference(raw, qtype).reshape(8, 256)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=1e-6, rtol=0)
    # a wide weight is dequantised a few rows at a time (3 rows here: chunks of 3, 3 and 2); the product of 3 rows
    # may take another BLAS kernel than that of 8 (another summation order, and which kernel runs depends on the
    # threads and what ran before in the process), so each chunk is compared with the product of the same rows of
    # the reference, and the whole with the one product within the error bound of a reordered float32 sum:
    # K * eps * sum |x_k w_k| (a wrong row would be off by the size of the outputs themselves)
    monkeypatch.setattr(gguf_module, "CHUNK_ELEMENTS", 3 * 256)
    chunked = layer(x)
    by_rows = torch.cat([F.linear(x, weight[start:start + 3], bias[start:start + 3]) for start in (0, 3, 6)], -1)
    torch.testing.assert_close(chunked, by_rows, atol=1e-6, rtol=0)
    reorder_bound = 257 * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().T + bias.abs())
    assert ((chunked - F.linear(x, weight, bias)).abs() <= reorder_bound).all()
    assert (F.linear(x, weight, bias).abs() > 100 * reorder_bound).float().mean() > 0.5  # the bound is tight
    monkeypatch.undo()
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()))
    assert set(layer.state_dict()) == {"weight", "bias"}
    plain = GGUFLinear(256, 8, qtype, bias=False)
    assert plain.bias is None and plain.weight.shape == layer.weight.shape
    with pytest.raises(ValueError, match="takes"):
        GGUFLinear.from_raw(raw[:, :-1], qtype, (8, 256))


def test_quantize_to_raw():
    w = torch.randn(4, 64)
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        raw = quantize_to_raw(w, qtype)
        assert raw.shape == byte_shape((4, 64), qtype)
        assert torch.equal(dequantize(raw, qtype, (4, 64)), reference(raw, qtype).reshape(4, 64))
        assert (dequantize(raw, qtype, (4, 64)) - w).abs().max() < (0.05 if qtype == T.Q8_0 else 0.5)
    assert torch.equal(dequantize(quantize_to_raw(w, T.F32), T.F32, (4, 64)), w)
    with pytest.raises(ValueError, match="cannot quantise to Q4_K"):
        quantize_to_raw(torch.randn(1, 256), T.Q4_K)


def write_example(path):
    tensors = {
        "double_blocks.0.img_attn.qkv.weight": (int(T.Q4_K), (8, 256), random_raw(T.Q4_K, (8, 256))),
        "double_blocks.0.img_attn.qkv.bias": (int(T.F32), (8,), random_raw(T.F32, (8,))),
        "img_in.weight": (int(T.Q8_0), (3, 64), quantize_to_raw(torch.randn(3, 64), T.Q8_0)),
        "final_layer.linear.weight": (int(T.BF16), (2, 4, 6), random_raw(T.BF16, (2, 4, 6))),
    }
    write_gguf(path, tensors)
    return tensors


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "model.gguf"
    tensors = write_example(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left behind
    f = read_gguf(path)
    assert f.architecture == "flux" and list(f.tensors) == list(tensors)
    for name, (qtype, shape, raw) in tensors.items():
        got_type, got_shape, got_raw = f.tensors[name]
        assert (got_type, got_shape) == (qtype, shape)
        assert got_raw.dtype == torch.uint8 and torch.equal(got_raw, raw.reshape(got_raw.shape))
    qtype, shape, raw = f.tensors["double_blocks.0.img_attn.qkv.weight"]
    layer = GGUFLinear.from_raw(raw, qtype, shape)
    assert torch.equal(layer.dequantized_weight(), reference(random_raw(T.Q4_K, (8, 256)), T.Q4_K).reshape(8, 256))


@pytest.mark.parametrize("keep", [0, 3, 10, 40, 0.5, -1])
def test_truncated_or_foreign_files_are_refused(tmp_path, keep):
    path = tmp_path / "model.gguf"
    write_example(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="model.gguf is not a readable GGUF file") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_corrupt_array_length_is_refused_at_once(tmp_path):
    # the first key/value is general.architecture (a string): retype it as an array of 2**40 uint32, which
    # gguf's own reader would walk past the end of the file element by element
    path = tmp_path / "model.gguf"
    write_example(path)
    data = bytearray(path.read_bytes())
    at = 4 + 4 + 8 + 8 + 8 + len("general.architecture")
    assert data[at:at + 4] == struct.pack("<I", gguf.GGUFValueType.STRING)
    data[at:at + 16] = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32, 2**40)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="the file ends inside a field"):
        read_gguf(path)


def test_read_tensors_are_mapped_copy_on_write(tmp_path):
    path = tmp_path / "model.gguf"
    write_example(path)
    before = path.read_bytes()
    raw = read_gguf(path).tensors["img_in.weight"][2]
    raw += 1  # writable (torch.from_numpy warns about read-only arrays), and the file is left alone
    assert path.read_bytes() == before


def test_not_gguf_and_missing(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="x.gguf is not a readable GGUF file"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="no GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
