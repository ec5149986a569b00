"""worker/gguf_tensors.py: every GGUF tensor type is imported exactly, or refused in one line.

The reference is the `gguf` package, llama.cpp's own Python library. Each test writes a tiny
llama GGUF with `gguf.GGUFWriter` whose matrices are all stored in one type -- quantized by
`gguf.quants.quantize` where the package can, else random blocks (every bit pattern is a valid
block) with sane float16 scales -- runs `import_gguf` on it, and compares every imported
matrix with `gguf.quants.dequantize` of the same bytes:

- kept packed (MLX affine: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K): `mx.dequantize` with the
  written group size, bits, scales and biases (in float32) equals gguf's values bit for bit;
- converted (Q2_K Q3_K Q6_K, IQ*, TQ*, MXFP4, NVFP4): float16 equal to gguf's float32 values
  rounded to float16;
- F32 / F16 / BF16: the stored values, in the stored dtype;
- anything else: one line naming the tensor and its type, exit 78.

    .venv/bin/python -m pytest -q tests/test_gguf_tensors.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.gguf import permute_weights, translate_weight_names

from shared.errors import DataError
from tests.conftest import overnight
from tests.test_gguf_import import gguf_metadata, train_tokenizer
from worker.gguf_import import import_gguf
from worker.gguf_read import GGUFTensor
from worker.gguf_tensors import dequantize_dtype, pack_bits

# A 1-layer llama whose rows are 256 wide, the K-quant super-block size.
HIDDEN, FFN, HEADS, KV_HEADS = 256, 256, 4, 2
PACKED_BITS = {  # type -> MLX bits (group size 32 for all): ggml-common.h block layouts
    "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5,
}  # fmt: skip
TO_FLOAT16 = [
    "Q2_K", "Q3_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
    "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
]  # fmt: skip
# Byte offsets of the float16 scales in each block (ggml-common.h), set to sane values in
# random blocks: random bits there would be inf/nan or 1e4-sized weights.
F16_SCALE_OFFSETS = {
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ1_S": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,),
    "IQ3_S": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,), "Q8_K": (0,),
}  # fmt: skip


# ---------------------------------------------------------------- writing test files


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `qtype` (uint8, rows x bytes) with float16 scales in [1e-4, 1.1e-3]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in F16_SCALE_OFFSETS.get(qtype.name, ()):
        d = (rng.random(raw.shape[:2]) * 0.001 + 0.0001).astype(np.float16)
        raw[..., off : off + 2] = d[..., None].view(np.uint8)
    if qtype.name == "IQ1_M":  # its float16 scale is spread over the top nibbles of 4 uint16s
        sc = raw[..., 48:56].copy().view(np.uint16)
        d = int(np.float16(0.0005).view(np.uint16))
        for i in range(4):
            sc[..., i] = (sc[..., i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        raw[..., 48:56] = sc.view(np.uint8)
    if qtype.name == "Q8_K":  # float32 d
        raw[..., 0:4] = np.full(raw.shape[:2], 0.001, np.float32)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def encode(qtype: T, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`x` (float32 rows x cols) stored as `qtype`: by gguf's quantizer, or random blocks."""
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        return random_blocks(qtype, *x.shape, rng)


def llama_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names -> numpy shapes (rows, cols) of the 1-layer test llama (untied)."""
    kv = HIDDEN // HEADS * KV_HEADS
    return {
        "token_embd.weight": (vocab, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (kv, HIDDEN),
        "blk.0.attn_v.weight": (kv, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (vocab, HIDDEN),
    }


def metadata(tok: Any) -> dict[str, Any]:
    return {
        **gguf_metadata(tok),
        "llama.embedding_length": HIDDEN,
        "llama.block_count": 1,
        "llama.feed_forward_length": FFN,
        "llama.rope.dimension_count": HIDDEN // HEADS,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
    }


def write_gguf(path: Path, md: dict[str, Any], tensors: dict[str, tuple[T, np.ndarray]]) -> None:
    """A GGUF file written by llama.cpp's own writer: metadata, then each tensor as (type, data).

    Quantized data is uint8 (rows x bytes); F32/F16 data is the float array itself."""
    w = gguf.GGUFWriter(str(path), md["general.architecture"])
    for key, value in md.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (qtype, data) in tensors.items():
        if qtype in (T.F32, T.F16, T.F64, T.I32):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(qtype: T, data: np.ndarray) -> np.ndarray:
    """gguf's float32 values of one stored tensor: the independent dequantizer."""
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype)


def llama_file(path: Path, tok: Any, types: dict[str, T], seed: int = 0) -> dict[str, np.ndarray]:
    """Write the test llama with each matrix in types.get(name, default types['*']), norms F32;
    return gguf's float32 values of every tensor (GGUF row order)."""
    rng = np.random.default_rng(seed)
    tensors, values = {}, {}
    for name, shape in llama_shapes(tok.get_vocab_size()).items():
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        qtype = T.F32 if len(shape) == 1 else types.get(name, types["*"])
        if len(shape) == 1:
            x += 1.0
        data = encode(qtype, x, rng)
        tensors[name] = (qtype, data)
        values[name] = reference(qtype, data)
    write_gguf(path, metadata(tok), tensors)
    return values


def imported_values(out: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """The imported model's tensors, each matrix dequantized by mx.dequantize with the
    group size, bits, scales and biases the import wrote (scales cast to float32), in GGUF's
    row order and under GGUF names; and config.json."""
    config = json.loads((out / "config.json").read_text())
    raw = mx.load(str(out / "model.safetensors"))
    q = config.get("quantization", {})
    out_values = {}
    for key, value in raw.items():
        if key.endswith((".scales", ".biases")):
            continue
        module = key.rsplit(".", 1)[0]
        if f"{module}.scales" in raw:
            params = q.get(module, q)
            value = mx.dequantize(
                value,
                raw[f"{module}.scales"].astype(mx.float32),
                raw[f"{module}.biases"].astype(mx.float32),
                group_size=params["group_size"],
                bits=params["bits"],
            )
        if "q_proj" in key:
            value = permute_weights(value, HEADS, HEADS)
        elif "k_proj" in key:
            value = permute_weights(value, HEADS, KV_HEADS)
        out_values[translate_weight_names(key)] = value
    return out_values, config


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer()


def as_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


# ---------------------------------------------------------------- every type, exactly


@pytest.mark.parametrize("type_name", sorted(PACKED_BITS))
def test_packed_types_dequantize_exactly_to_gguf_values(tok, tmp_path: Path, type_name) -> None:
    """Kept quantized: mx.dequantize of what we wrote == gguf.quants.dequantize, bit for bit."""
    expected = llama_file(tmp_path / "m.gguf", tok, {"*": T[type_name]})
    import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    got, config = imported_values(tmp_path / "out")
    bits = PACKED_BITS[type_name]
    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (32, bits, "affine")
    assert all(v is not False for k, v in q.items() if k.startswith("model.")), q
    for name, ref in expected.items():
        assert got[name].dtype == mx.float32, name
        assert np.array_equal(as_np(got[name]), ref), f"{name} ({type_name}) differs"
    # The embedding is looked up with its own scales' dtype (QuantizedEmbedding): float32.
    raw = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert raw["model.embed_tokens.scales"].dtype == mx.float32
    ids = mx.array([[3, 17, 250]])
    model, _ = load(str(tmp_path / "out"))
    rows = np.array(model.model.embed_tokens(ids))[0]
    assert np.array_equal(rows, expected["token_embd.weight"][[3, 17, 250]])


@pytest.mark.parametrize("type_name", TO_FLOAT16)
def test_other_quantized_types_become_float16_of_gguf_values(tok, tmp_path: Path, type_name):
    """Types MLX cannot hold (16-wide groups, non-linear grids): gguf's values, rounded once
    to float16 -- with and without --dequantize."""
    expected = llama_file(tmp_path / "m.gguf", tok, {"*": T[type_name]})
    for dequantize in (False, True):
        out = tmp_path / f"out-{dequantize}"
        summary = import_gguf(tmp_path / "m.gguf", out, dequantize=dequantize)
        got, config = imported_values(out)
        assert "quantization" not in config and summary.quantization == "none"
        assert config["torch_dtype"] == "float16"
        for name, ref in expected.items():
            if ref.ndim == 2:
                assert got[name].dtype == mx.float16, name
                assert np.array_equal(as_np(got[name]), ref.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("type_name", sorted(PACKED_BITS))
def test_dequantize_gives_float16_of_gguf_values(tok, tmp_path: Path, type_name) -> None:
    expected = llama_file(tmp_path / "m.gguf", tok, {"*": T[type_name]})
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", dequantize=True)
    got, config = imported_values(tmp_path / "out")
    assert "quantization" not in config and config["torch_dtype"] == "float16"
    for name, ref in expected.items():
        assert got[name].dtype == mx.float16, name
        assert np.array_equal(as_np(got[name]), ref.astype(np.float16).astype(np.float32)), name


@pytest.mark.parametrize(
    ("type_name", "dtype"),
    [("F32", mx.float32), ("F16", mx.float16), ("BF16", mx.bfloat16)],
)
@pytest.mark.parametrize("dequantize", [False, True], ids=["kept", "dequantize"])
def test_float_types_keep_their_dtype_and_values(tok, tmp_path, type_name, dtype, dequantize):
    """F32/F16/BF16 matrices are copied bit for bit; a bf16 file stays bf16 (it used to
    become float16, which turns 3e38 into inf and 1e-30 into 0)."""
    expected = llama_file(tmp_path / "m.gguf", tok, {"*": T[type_name]})
    summary = import_gguf(tmp_path / "m.gguf", tmp_path / "out", dequantize=dequantize)
    got, config = imported_values(tmp_path / "out")
    assert config["torch_dtype"] == summary.dtype == str(dtype).removeprefix("mlx.core.")
    for name, ref in expected.items():
        if ref.ndim == 2:
            assert got[name].dtype == dtype, name
            assert np.array_equal(as_np(got[name]), ref), name


def test_bf16_values_outside_float16_range_survive(tok, tmp_path: Path) -> None:
    md = metadata(tok)
    values = np.array([3.0e38, -1.0e-30, 1.0e5, 1.2345678, 7.0e-8], np.float32)
    tensors = {}
    for name, shape in llama_shapes(tok.get_vocab_size()).items():
        x = np.resize(values, shape).astype(np.float32)
        tensors[name] = (T.F32, x) if len(shape) == 1 else (T.BF16, gguf.quants.quantize(x, T.BF16))
    write_gguf(tmp_path / "bf16.gguf", md, tensors)
    import_gguf(tmp_path / "bf16.gguf", tmp_path / "out")
    got, _ = imported_values(tmp_path / "out")
    v = as_np(got["blk.0.ffn_up.weight"])[0, :5]
    bf16 = np.array([3.0040553e38, -9.9840208e-31, 99840.0, 1.234375, 6.9849193e-08], np.float32)
    assert np.array_equal(v, bf16), v


def test_k_quant_mix_loads_in_mlx_lm_and_computes_gguf_logits(tok, tmp_path: Path) -> None:
    """A file shaped like llama.cpp's Q4_K_M: Q4_K matrices, Q6_K attn_v/output, a Q5_0
    fallback (rows not a multiple of 256 get Q5_0 in llama-quantize), F32 norms. mlx_lm loads
    it with per-layer quantization, its logits equal a float32 model holding gguf's values,
    and a LoRA step trains on it."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    types = {
        "*": T.Q4_K,
        "blk.0.attn_v.weight": T.Q6_K,
        "output.weight": T.Q6_K,
        "blk.0.ffn_down.weight": T.Q5_0,
    }
    expected = llama_file(tmp_path / "m.gguf", tok, types)
    summary = import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert summary.quantization == (
        "4-bit, group 32 (lm_head float, model.layers.0.mlp.down_proj 5-bit, "
        "model.layers.0.self_attn.v_proj float)"
    )
    assert summary.tensor_types == "Q4_K 6, F32 3, Q6_K 2, Q5_0 1"
    model, _ = load(str(tmp_path / "out"))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert layer.mlp.down_proj.bits == 5 and isinstance(layer.self_attn.v_proj, nn.Linear)

    # The reference: a float32 model holding gguf's values in GGUF's own Q/K row order, which
    # computes the same logits with interleaved (traditional) RoPE.
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config.pop("quantization")
    ref_model = llama.Model(llama.ModelArgs.from_dict({**config, "rope_traditional": True}))
    as_written = {n: v.astype(np.float16).astype(np.float32) if types.get(n) == T.Q6_K else v
                  for n, v in expected.items()}  # Q6_K: documented float16 rounding  # fmt: skip
    ref_model.load_weights(
        [(k, mx.array(as_written[translate_weight_names(k)]))
         for k, _ in tree_flatten(ref_model.parameters())]
    )  # fmt: skip
    tokens = mx.array([[5, 17, 42, 99, 3, 250, 7, 64]])
    np.testing.assert_allclose(as_np(model(tokens)), as_np(ref_model(tokens)), rtol=1e-5, atol=1e-5)

    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss, grads = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(x), y).mean())(model)
    optim.Adam(learning_rate=1e-2).update(model, grads)
    assert np.isfinite(loss.item())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_bits_is_mlx_layout(bits: int) -> None:
    q = np.random.default_rng(bits).integers(0, 2**bits, (3, 128)).astype(np.uint8)
    packed = mx.array(pack_bits(q, bits))
    assert packed.dtype == mx.uint32 and packed.shape == (3, 128 * bits // 32)
    ones, zeros = mx.ones((3, 4)), mx.zeros((3, 4))
    assert np.array_equal(np.array(mx.dequantize(packed, ones, zeros, 32, bits)), q)


# ---------------------------------------------------------------- refused, in one line


@pytest.mark.parametrize(
    ("qtype", "data", "message"),
    [
        (T.Q8_K, None, r"has type Q8_K"),
        (T.F64, np.zeros((HIDDEN, HIDDEN)), r"has type F64, float64, which float32 would"),
        (T.I32, np.zeros((HIDDEN, HIDDEN), np.int32), r"has type I32, integers"),
    ],
    ids=["Q8_K", "F64", "I32"],
)
def test_types_that_cannot_be_imported_exactly_are_refused(tok, tmp_path, qtype, data, message):
    expected = llama_file(tmp_path / "ok.gguf", tok, {"*": T.F32})
    tensors = {n: (T.F32, v) for n, v in expected.items()}
    if data is None:
        data = random_blocks(qtype, HIDDEN, HIDDEN, np.random.default_rng(0))
    tensors["blk.0.attn_q.weight"] = (qtype, data)
    write_gguf(tmp_path / "odd.gguf", metadata(tok), tensors)
    with pytest.raises(DataError, match=rf"odd\.gguf: tensor blk\.0\.attn_q\.weight {message}"):
        import_gguf(tmp_path / "odd.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_type_id_is_refused_by_name(tok, tmp_path: Path) -> None:
    """Type 31 was Q4_0_4_4, an ARM repacking llama.cpp wrote in 2024 and then removed."""
    llama_file(tmp_path / "m.gguf", tok, {"*": T.F32, "blk.0.attn_q.weight": T.Q4_0})
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims, 2 dims, then the type
    assert data[at : at + 4] == int(T.Q4_0).to_bytes(4, "little")
    data[at : at + 4] = (31).to_bytes(4, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    match = r"m\.gguf: tensor blk\.0\.attn_q\.weight has type id 31 \(Q4_0_4_4, removed from"
    with pytest.raises(DataError, match=match) as e:
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert "\n" not in str(e.value)


def test_truncated_file_says_so(tok, tmp_path: Path) -> None:
    llama_file(tmp_path / "m.gguf", tok, {"*": T.Q4_K})
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(DataError, match=r"m\.gguf: tensor .* past the end of the file: an incomp"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")


@pytest.mark.parametrize(
    ("kinds", "dtype"),
    [
        ({"F16", "Q4_K"}, "float16"),
        ({"Q6_K"}, "float16"),
        ({"F32", "Q8_0"}, "float32"),
        ({"BF16"}, "bfloat16"),
        ({"BF16", "Q4_0"}, "float32"),
        ({"BF16", "F16"}, "float32"),
    ],
)
def test_dequantize_picks_one_dtype_that_loses_no_stored_float(kinds: set, dtype: str) -> None:
    tensors = {
        f"t{i}": GGUFTensor(f"t{i}", kind, (32, 256), np.zeros(0)) for i, kind in enumerate(kinds)
    }
    tensors["norm"] = GGUFTensor("norm", "F32", (256,), np.zeros(0))  # 1-D: does not count
    assert dequantize_dtype(tensors) == dtype


def test_big_endian_file_is_refused(tok, tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.ones((4, HIDDEN), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DataError, match=r"be\.gguf: a big-endian GGUF file; only little-endian"):
        import_gguf(tmp_path / "be.gguf", tmp_path / "out")


def test_non_finite_weights_are_refused(tok, tmp_path: Path) -> None:
    expected = llama_file(tmp_path / "ok.gguf", tok, {"*": T.F16})
    tensors = {n: (T.F32 if v.ndim == 1 else T.F16, v.astype(np.float16) if v.ndim == 2 else v)
               for n, v in expected.items()}  # fmt: skip
    tensors["blk.0.attn_v.weight"][1][3, 5] = np.nan
    write_gguf(tmp_path / "nan.gguf", metadata(tok), tensors)
    with pytest.raises(
        DataError, match=r"nan\.gguf: tensor blk\.0\.attn_v\.weight \(F16\) holds 1 non-finite"
    ):
        import_gguf(tmp_path / "nan.gguf", tmp_path / "out")


def test_values_beyond_float16_are_refused_not_rounded_to_inf(tok, tmp_path: Path) -> None:
    expected = llama_file(tmp_path / "m.gguf", tok, {"*": T.F32})
    tensors = {n: (T.F32, v) for n, v in expected.items()}
    raw = random_blocks(T.Q6_K, HIDDEN, HIDDEN, np.random.default_rng(0))
    raw.reshape(HIDDEN, -1, 210)[0, 0, 208:210] = np.array([30000.0], np.float16).view(np.uint8)
    tensors["blk.0.ffn_up.weight"] = (T.Q6_K, raw)
    write_gguf(tmp_path / "big.gguf", metadata(tok), tensors)
    with pytest.raises(
        DataError, match=r"tensor blk\.0\.ffn_up\.weight \(Q6_K\) has values up to .* float16"
    ):
        import_gguf(tmp_path / "big.gguf", tmp_path / "out")


def test_command_refuses_with_one_line_and_exit_78(tok, tmp_path: Path) -> None:
    expected = llama_file(tmp_path / "ok.gguf", tok, {"*": T.F32})
    tensors = {n: (T.F32, v) for n, v in expected.items()}
    tensors["blk.0.ffn_gate.weight"] = (
        T.Q8_K,
        random_blocks(T.Q8_K, FFN, HIDDEN, np.random.default_rng(1)),
    )
    write_gguf(tmp_path / "q8k.gguf", metadata(tok), tensors)
    done = overnight("import-gguf", str(tmp_path / "q8k.gguf"), str(tmp_path / "out"))
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "blk.0.ffn_gate.weight" in lines[0] and "Q8_K" in lines[0]
    assert "expected a GGUF file" not in lines[0]
