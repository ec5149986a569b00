"""GGUF tensors -> MLX arrays: each tensor type imported exactly, or refused in one line.

A tensor's bytes (as `gguf.GGUFReader` maps them, worker/gguf_read.py) become, with the help of
the `gguf` package (llama.cpp's own Python library: type names, block sizes, dequantization):

- F32, F16, BF16: the stored values in the same dtype (bit copies).
- Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K matrices: kept packed in MLX's affine format (group 32,
  4/5/8 bits), exactly.
- Q2_K Q3_K Q6_K, IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS, TQ1_0 TQ2_0,
  MXFP4 NVFP4: float16, gguf's float32 values rounded once.
- Anything else (Q8_K, Q8_1, F64, integer types): refused with a DataError naming the tensor
  and its type. (A type id the gguf package does not know is refused, by name, when the file
  is read: worker/gguf_read.py.)

"Exact" means: `mx.dequantize(weight, scales, biases, 32, bits)` computed in float32 equals
`gguf.quants.dequantize` of the same bytes bit for bit (tests/test_gguf_tensors.py checks every
type). MLX's affine format is `w = scale * q + bias` per group of 32 with unsigned q; llama.cpp's
blocks (ggml-common.h, dequantize_row_* in ggml-quants.c) map onto it as:

    Q4_0  w = d * (q - 8)                scale d, bias -8 d      (q 4 bits)
    Q4_1  w = d * q + m                  scale d, bias m
    Q5_0  w = d * (q - 16)               scale d, bias -16 d     (q 5 bits)
    Q5_1  w = d * q + m                  scale d, bias m
    Q8_0  w = d * q8 (q8 signed)         scale d, bias -128 d    (q = q8 + 128)
    Q4_K  w = (d * sc_j) * q - dmin * m_j   per 32-wide sub-block j (6-bit sc_j, m_j)
    Q5_K  the same with 5-bit q

Every product scale * q is exact in float32 (at most 11 + 6 + 5 significant bits) and the
single rounding of the sum is the one llama.cpp's own dequantization makes. Scales and biases
are float16 where that holds them exactly (d and m are float16 in the file), float32 otherwise
(d * sc_j has up to 17 significant bits) and always for the token embedding, because
`QuantizedEmbedding` dequantizes in its scales' dtype and float16 arithmetic would round
d * (q + 128) - 128 d. `QuantizedLinear` with float32 activations (our float32 norms keep them
float32) computes in float32 with either.

Types whose groups are 16 wide (Q2_K, Q3_K, Q6_K; MLX groups are 32, 64 or 128) or whose values
lie on non-linear grids (IQ*, MXFP4, NVFP4) cannot be MLX affine-quantized exactly: they are
dequantized by `gguf.quants.dequantize` (numpy) and stored as float16. A value beyond float16's
range, or a non-finite value in any tensor, is refused rather than written as inf/nan.

Why not `mx.load`: mlx 0.32.4 reads GGUF through gguflib, which (checked against the gguf
package on the same bytes) returns Q4_K with the even sub-block's scale and min applied to the
odd sub-blocks (half the weights wrong), turns BF16 into float16 (3e38 -> inf, 1e-30 -> 0),
silently drops TQ1_0/TQ2_0/MXFP4 tensors, and fails the whole file on Q5_0, Q5_1, Q3_K, Q5_K
and every IQ type. Its Q4_0/Q4_1/Q8_0 packing, F16/F32 and Q2_K/Q6_K results are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import DataError
from worker.gguf_read import GGUFTensor

if TYPE_CHECKING:
    import mlx.core as mx

FLOAT_TYPES = ("F32", "F16", "BF16")
TO_FLOAT16 = (
    "Q2_K", "Q3_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
    "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
)  # fmt: skip


# ---------------------------------------------------------------- block layouts -> (q, scale, bias)
# Each function takes blocks (..., n_blocks, block_bytes) and returns q (..., n_groups, 32) uint8
# and scale, bias (..., n_groups) float32, so that w = scale * q + bias per group of 32.

Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray]


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 from the last axis (2 bytes) as float32."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit order: element j in the low nibble of byte j, j + n in the high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Bit j of the little-endian uint32 `qh` (4 bytes), for j = 0..31."""
    return (np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1


def _q4_0(b: np.ndarray) -> Unpacked:  # block_q4_0: d, qs[16]
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:18])[..., None, :], d[..., None], -8 * d[..., None]


def _q4_1(b: np.ndarray) -> Unpacked:  # block_q4_1: d, m, qs[16]
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _nibbles(b[..., 4:20])[..., None, :], d[..., None], m[..., None]


def _q5_0(b: np.ndarray) -> Unpacked:  # block_q5_0: d, qh[4], qs[16]
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6]).astype(np.uint8) << 4)
    return q[..., None, :], d[..., None], -16 * d[..., None]


def _q5_1(b: np.ndarray) -> Unpacked:  # block_q5_1: d, m, qh[4], qs[16]
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8]).astype(np.uint8) << 4)
    return q[..., None, :], d[..., None], m[..., None]


def _q8_0(b: np.ndarray) -> Unpacked:  # block_q8_0: d, qs[32] (int8)
    d = _f16(b[..., 0:2])
    return (b[..., 2:34] ^ 0x80)[..., None, :], d[..., None], -128 * d[..., None]


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block (get_scale_min_k4 in ggml-quants.c)."""
    s = b[..., 4:16]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return d[..., None] * sc.astype(np.float32), -(dmin[..., None] * mn.astype(np.float32))


def _q4_k(b: np.ndarray) -> Unpacked:  # block_q4_K: d, dmin, scales[12], qs[128]
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    return (q, *_k_scales(b))


def _q5_k(b: np.ndarray) -> Unpacked:  # block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    qh = b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]  # bit j: sub-block j
    return (q | ((qh & 1) << 4), *_k_scales(b))


PACKED: dict[str, tuple[int, Callable[[np.ndarray], Unpacked]]] = {
    "Q4_0": (4, _q4_0),
    "Q4_1": (4, _q4_1),
    "Q5_0": (5, _q5_0),
    "Q5_1": (5, _q5_1),
    "Q8_0": (8, _q8_0),
    "Q4_K": (4, _q4_k),
    "Q5_K": (5, _q5_k),
}
SUPPORTED = (*FLOAT_TYPES, *PACKED, *TO_FLOAT16)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: values LSB-first in a little-endian bit stream, read as uint32.

    q: uint8 (rows, cols), values < 2**bits, cols a multiple of 32 -> uint32 (rows,
    cols * bits / 32). For 3, 5 and 6 bits, eight values fill exactly `bits` bytes: they are
    or-ed into a uint64 whose low `bits` bytes are kept."""
    rows, cols = q.shape
    if bits == 8:
        stream = q
    elif bits == 4:
        stream = q[:, 0::2] | (q[:, 1::2] << 4)
    else:
        eight = q.reshape(rows, cols // 8, 8).astype("<u8")
        word = eight[..., 0].copy()
        for i in range(1, 8):
            word |= eight[..., i] << np.uint64(bits * i)
        stream = word.view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]
    return np.ascontiguousarray(stream).reshape(rows, cols * bits // 8).view("<u4")


# ---------------------------------------------------------------- conversion


def _refuse(path: Path, t: GGUFTensor, why: str) -> DataError:
    return DataError(f"{path}: tensor {t.name} has type {t.type_name}, {why}")


def _check_finite(path: Path, t: GGUFTensor, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise DataError(
            f"{path}: tensor {t.name} ({t.type_name}) holds {bad} non-finite value(s) "
            "(inf/nan): the file is damaged"
        )


def _narrow(path: Path, t: GGUFTensor, x: np.ndarray, dtype: str) -> mx.array:
    """float32 `x` as an MLX array of `dtype`, refusing values beyond float16's range."""
    import mlx.core as mx

    if dtype == "float16" and (big := float(np.abs(x).max(initial=0.0))) > 65504.0:
        raise DataError(
            f"{path}: tensor {t.name} ({t.type_name}) has values up to {big:.3g}, beyond "
            "float16's range (65504); not imported"
        )
    return mx.array(x).astype(getattr(mx, dtype))


def _floats(t: GGUFTensor) -> np.ndarray:
    """float32 values of a tensor gguf can dequantize (raises NotImplementedError if not)."""
    import gguf

    if t.type_name in ("F32", "F16"):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[t.type_name])


def _bf16(t: GGUFTensor) -> mx.array:
    import mlx.core as mx

    return mx.array(np.ascontiguousarray(t.data).view("<u2").reshape(t.shape)).view(mx.bfloat16)


def _packed(path: Path, t: GGUFTensor) -> dict[str, mx.array]:
    """weight/scales/biases of an affine-packable tensor (2-D, rows of whole blocks)."""
    import gguf
    import mlx.core as mx

    bits, unpack = PACKED[t.type_name]
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type_name]][1]
    rows, cols = t.shape
    blocks = np.asarray(t.data).reshape(rows, -1, block_bytes)
    q, scale, bias = unpack(blocks)
    scale, bias = scale.reshape(rows, -1), bias.reshape(rows, -1)
    _check_finite(path, t, scale)
    _check_finite(path, t, bias)
    dtype = np.float32
    if t.name != "token_embd.weight" and all(
        np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in (scale, bias)
    ):
        dtype = np.float16
    base = t.name.removesuffix(".weight")
    return {
        t.name: mx.array(pack_bits(q.reshape(rows, cols), bits)),
        f"{base}.scales": mx.array(scale.astype(dtype)),
        f"{base}.biases": mx.array(bias.astype(dtype)),
    }


def convert(path: Path, t: GGUFTensor, *, dtype: str | None) -> dict[str, mx.array]:
    """The MLX arrays for one tensor, under GGUF names (`x.weight`, plus `x.scales` and
    `x.biases` when kept packed).

    dtype None keeps the file's precision: float types as stored, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/
    Q4_K/Q5_K matrices packed, other quantized types float16. A dtype ("float16",
    "bfloat16", "float32") converts every tensor to it (gguf's float32 values rounded once).
    Raises DataError for types that cannot be imported exactly and for non-finite values."""
    import mlx.core as mx

    name = t.type_name
    if name not in SUPPORTED:
        if name == "F64":
            why = "float64, which float32 would round"
        elif name in ("Q8_K", "Q8_1"):
            why = "an intermediate type llama.cpp does not store weights in"
        elif name in ("I8", "I16", "I32", "I64"):
            why = "integers, not weights"
        else:
            why = f"which this importer was not checked against (supported: {', '.join(SUPPORTED)})"
        raise _refuse(path, t, f"{why}; cannot import it exactly")
    if name == "BF16":
        x = _bf16(t)
        values = np.array(x.astype(mx.float32))
        _check_finite(path, t, values)
        return {t.name: x if dtype in (None, "bfloat16") else _narrow(path, t, values, dtype)}
    if dtype is None and name in PACKED and len(t.shape) == 2:
        return _packed(path, t)
    try:
        values = _floats(t)
    except NotImplementedError:
        raise _refuse(path, t, "which this version of the gguf package cannot dequantize") from None
    _check_finite(path, t, values)
    if dtype is None:
        dtype = {"F32": "float32", "F16": "float16"}.get(name, "float16")
    return {t.name: _narrow(path, t, values, dtype)}


def dequantize_dtype(tensors: dict[str, GGUFTensor]) -> str:
    """The one dtype for `--dequantize`: float32 if the file stores float32 matrices, or mixes
    bfloat16 with float16/quantized ones (neither 16-bit type holds the other); bfloat16 if
    every matrix is bfloat16; else float16 (quantized values rounded once)."""
    kinds = {t.type_name for t in tensors.values() if len(t.shape) >= 2}
    if "F32" in kinds or ("BF16" in kinds and kinds != {"BF16"}):
        return "float32"
    return "bfloat16" if kinds == {"BF16"} else "float16"
