"""`overnight import-gguf FILE.gguf OUT_DIR`: turn a llama GGUF file into an mlx_lm model dir.

    overnight import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2          # QLoRA-ready
    overnight import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-f16 --dequantize

llama.cpp's `gguf` package reads the file (`GGUFReader`, worker/gguf_read.py; a file it cannot
read -- cut short, a tensor type id it does not know, big-endian -- is refused in one line) and
worker/gguf_tensors.py, with the same package, turns each tensor into MLX arrays exactly or
refuses it: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K matrices stay packed in MLX's affine layout
(groups of 32), other quantized types become float16, F32/F16/BF16 stay as stored. Not
`mx.load`: see worker/gguf_tensors.py for what mlx's GGUF reader gets wrong. We rename the
tensors to mlx_lm's llama names, undo llama.cpp's Q/K row permutation, write `config.json` +
`model.safetensors` with mlx_lm's own `save_model` / `save_config`, and rebuild the tokenizer
from the GGUF vocabulary (worker/gguf_tokenizer.py).

Rotary embeddings: llama.cpp's converter permutes the rows of every head of `attn_q`/`attn_k`
from Hugging Face's half-split layout (rotate dims i and i + d/2) to the interleaved one (rotate
dims 2i and 2i + 1). Loading those rows as they are is correct with `rope_traditional: true`,
because q·k is unchanged when both are permuted alike (tests/test_gguf_import.py checks it). We
un-permute instead (exact, also for quantized rows, which are grouped along the input axis) and
keep the default `rope_traditional: false`: the result is then the same model as the Hugging
Face checkpoint, so adapters and tools that assume that layout (mlx_lm's GGUF export, which
permutes again) stay correct.

Longer than 400 lines: the steps of one conversion (read, name, un-permute, requantize,
write) share the name tables and the per-tensor quantization bookkeeping; the tokenizer,
the one separable part, is already its own module.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError, DataError

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from worker.gguf_read import GGUFTensor

# GGUF tensor names (llama.cpp's LLM_ARCH_LLAMA table) -> mlx_lm llama module paths.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED_LAYER_TENSORS = {"attn_rot_embd"}  # precomputed rotary tables in very old files
_SUFFIXES = "weight|bias|scales|biases"
_LAYER_RE = re.compile(rf"blk\.(\d+)\.([a-z_]+)\.({_SUFFIXES})")
_GLOBAL_RE = re.compile(rf"([a-z_]+)\.({_SUFFIXES})")
# Files an import writes; with --force these are replaced in a non-empty OUT_DIR.
_MODEL_FILE_GLOBS = (
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote, for the one-paragraph report the command prints."""

    out_dir: Path
    num_layers: int
    num_parameters: int
    dtype: str
    quantization: str  # "none", or e.g. "4-bit, group 32 (model.embed_tokens 8-bit)"
    tensor_types: str  # the file's GGUF tensor types by count, e.g. "Q4_K 155, F32 61, Q6_K 25"
    bytes_written: int
    seconds: float


def add_import_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, metavar="FILE.gguf", help="a llama GGUF file")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="model directory to write")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="write float weights (float16; float32 if the file stores float32 matrices; "
        "bfloat16 if all are bfloat16) instead of keeping Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K "
        "matrices quantized for QLoRA",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT_DIR, replacing its model and tokenizer files",
    )


def main_import_gguf(args: argparse.Namespace) -> int:
    s = import_gguf(args.gguf, args.out_dir, dequantize=args.dequantize, force=args.force)
    print(
        f"imported {args.gguf} -> {s.out_dir}: llama, {s.num_layers} layers, "
        f"{s.num_parameters / 1e6:.1f}M parameters, {s.dtype}, quantization: {s.quantization} "
        f"(GGUF tensors: {s.tensor_types}); {s.bytes_written / 1e6:.1f} MB in {s.seconds:.1f} s"
    )
    return 0


def import_gguf(
    gguf: Path, out_dir: Path, *, dequantize: bool = False, force: bool = False
) -> ImportSummary:
    """Convert `gguf` into an mlx_lm model directory at `out_dir`; raise DataError/ConfigError
    (one line: a tensor type that cannot be imported exactly names the tensor and its type)."""
    from worker.gguf_read import read_gguf
    from worker.gguf_tensors import convert, dequantize_dtype

    start = time.monotonic()
    _check_paths(gguf, out_dir, force)
    tensors, metadata = read_gguf(gguf)
    config = llama_config(gguf, metadata, tensors)
    used = {n: t for n, t in tensors.items() if mlx_name(gguf, n) is not None}
    types = Counter(t.type_name for t in used.values())
    dtype = dequantize_dtype(used) if dequantize else None
    arrays = {k: v for t in used.values() for k, v in convert(gguf, t, dtype=dtype).items()}
    del tensors, used
    weights = mlx_weights(gguf, arrays, config)
    del arrays
    model, quantization = build_model(gguf, weights, config)

    target = out_dir.resolve()
    tmp = target.parent / f".{target.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model_dir(gguf, metadata, model, config, tmp)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = sum(p.stat().st_size for p in out_dir.glob("model*.safetensors"))
    return ImportSummary(
        out_dir=out_dir,
        num_layers=config["num_hidden_layers"],
        num_parameters=_num_parameters(model),
        dtype=config["torch_dtype"],
        quantization=quantization,
        tensor_types=", ".join(f"{k} {n}" for k, n in types.most_common()),
        bytes_written=written,
        seconds=time.monotonic() - start,
    )


def _check_paths(gguf: Path, out_dir: Path, force: bool) -> None:
    if not gguf.is_file():
        raise ConfigError(f"{gguf}: no such file (expected a GGUF model file)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(
            f"{out_dir}: directory exists and is not empty (use --force to replace its model files)"
        )


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def llama_config(path: Path, md: dict[str, Any], tensors: dict[str, GGUFTensor]) -> dict[str, Any]:
    """mlx_lm's llama config.json from the GGUF metadata (and the tensors' shapes)."""
    arch = md.get("general.architecture")
    if arch != "llama":
        raise DataError(f"{path}: expected general.architecture 'llama', got {arch!r}")

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = md.get(f"llama.{key}")
        if value is None:
            if default is None:
                raise DataError(f"{path}: expected metadata key llama.{key}, it is missing")
            return default
        if kind is int and (not isinstance(value, int) or value <= 0):
            raise DataError(f"{path}: llama.{key} must be a positive integer, got {value!r}")
        if kind is float and not isinstance(value, (int, float)):
            raise DataError(f"{path}: llama.{key} must be a number, got {value!r}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if (rope_dim := get("rope.dimension_count", head_dim)) != head_dim:
        raise DataError(
            f"{path}: llama.rope.dimension_count is {rope_dim} but heads are {head_dim} wide; "
            "partial rotary embeddings are not supported"
        )
    if md.get("llama.expert_count"):
        raise DataError(f"{path}: mixture-of-experts llama files are not supported")
    if "rope_freqs.weight" in tensors:
        raise DataError(
            f"{path}: has rope_freqs.weight (Llama 3.1-style rope scaling), which is not supported"
        )
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise DataError(f"{path}: expected a token_embd.weight tensor, found none")

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0, kind=float)),
        "rope_traditional": False,  # Q/K rows are un-permuted to the Hugging Face layout
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if isinstance(context := md.get("llama.context_length"), int):
        config["max_position_embeddings"] = context
    scaling = md.get("llama.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": _f32(get("rope.scaling.factor", kind=float)),
        }
    elif scaling not in (None, "none"):
        raise DataError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported")
    return config


def mlx_name(path: Path, name: str) -> str | None:
    """The mlx_lm parameter name of a GGUF tensor; None for tensors mlx_lm does not use."""
    if m := _LAYER_RE.fullmatch(name):
        layer, part, suffix = m.groups()
        if part in _IGNORED_LAYER_TENSORS:
            return None
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    elif (m := _GLOBAL_RE.fullmatch(name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise DataError(f"{path}: tensor {name!r} is not part of a llama model")


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head Q/K row permutation (interleaved -> half-split rotary layout).

    llama.cpp writes `hf.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2)`, so GGUF row
    h*d + 2*i + j holds Hugging Face row h*d + j*(d//2) + i. Rows are independent (quantization
    groups run along the input axis), so this works on weights, scales, biases and bias alike.
    """
    import mlx.core as mx

    rows = x.shape[0]
    half = rows // n_heads // 2
    shape = x.shape[1:]
    return mx.reshape(mx.swapaxes(mx.reshape(x, (n_heads, half, 2, *shape)), 1, 2), (rows, *shape))


def mlx_weights(
    path: Path, tensors: dict[str, mx.array], config: dict[str, Any]
) -> dict[str, mx.array]:
    """GGUF tensors under mlx_lm names, with Q/K in the Hugging Face row order."""
    weights = {}
    for name, x in tensors.items():
        if (new := mlx_name(path, name)) is not None:
            weights[new] = x
    for i in range(config["num_hidden_layers"]):
        for proj, n in (
            ("q_proj", config["num_attention_heads"]),
            ("k_proj", config["num_key_value_heads"]),
        ):
            for suffix in ("weight", "scales", "biases", "bias"):
                key = f"model.layers.{i}.self_attn.{proj}.{suffix}"
                if key not in weights:
                    continue
                if weights[key].shape[0] % (2 * n):
                    raise DataError(
                        f"{path}: {key} has {weights[key].shape[0]} rows, "
                        f"expected a multiple of 2 x {n} heads"
                    )
                weights[key] = unpermute_rows(weights[key], n)
    return weights


def _quant_params(path: Path, p: str, module: nn.Module, weights: dict) -> dict[str, Any]:
    """group_size and bits of one quantized layer, recovered from the packed shapes."""
    if f"{p}.weight" not in weights or f"{p}.biases" not in weights:
        raise DataError(f"{path}: quantized {p} has scales but no packed weight or biases")
    in_dims = module.weight.shape[-1]
    packed, scales = weights[f"{p}.weight"], weights[f"{p}.scales"]
    group_size = in_dims // max(scales.shape[-1], 1)
    bits = packed.shape[-1] * 32 // in_dims
    if group_size * scales.shape[-1] != in_dims or bits * in_dims != packed.shape[-1] * 32:
        raise DataError(
            f"{path}: quantized {p} has shapes {packed.shape}/{scales.shape}, "
            f"which do not pack {in_dims} inputs"
        )
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def build_model(path: Path, weights: dict, config: dict[str, Any]) -> tuple[nn.Module, str]:
    """The mlx_lm llama model holding `weights`, and a one-line description of its quantization.

    The weights are used as converted (worker/gguf_tensors.py): norms stay float32 (as llama.cpp
    keeps them, so activations run in float32, which is also ~35x faster than float16 for mlx's
    quantized matmul on CPU). config["quantization"] gets the most common group/bits plus
    per-layer entries: a dict for layers packed differently (llama.cpp often keeps token_embd
    at 8 bits, and falls back to Q5_0 for rows K-quants cannot hold), False for layers that are
    float (F16/BF16 matrices, Q6_K and other types MLX cannot hold packed).
    config["torch_dtype"] is the most common dtype of the float matrices (of the scales if
    every matrix is packed).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    per_layer: dict[str, Any] = {
        p: _quant_params(path, p, m, weights) if f"{p}.scales" in weights else False
        for p, m in model.named_modules()
        if hasattr(m, "to_quantized")
    }
    description = "none"
    if any(per_layer.values()):
        config["quantization"], description = _quantization_config(per_layer)
        nn.quantize(model, class_predicate=lambda p, _: per_layer.get(p, False))
    floats = Counter(
        x.dtype
        for k, x in weights.items()
        if x.ndim >= 2
        and mx.issubdtype(x.dtype, mx.floating)
        and not k.endswith((".scales", ".biases"))
    )
    kinds = floats or Counter(x.dtype for k, x in weights.items() if k.endswith(".scales"))
    dtype = kinds.most_common(1)[0][0] if kinds else mx.float32
    config["torch_dtype"] = str(dtype).removeprefix("mlx.core.")

    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise DataError(
            f"{path}: tensors do not match the llama model its metadata describes ({e})"
        ) from None
    mx.eval(model.parameters())
    return model, description


def _quantization_config(per_layer: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """config.json's `quantization` (default + per-layer exceptions) and a description."""
    counts = Counter((q["group_size"], q["bits"]) for q in per_layer.values() if q)
    (group_size, bits), _ = counts.most_common(1)[0]
    default = {"group_size": group_size, "bits": bits, "mode": "affine"}
    exceptions = {p: q for p, q in per_layer.items() if q != default}
    notes = [f"{p} {q['bits']}-bit" if q else f"{p} float" for p, q in exceptions.items()]
    description = f"{bits}-bit, group {group_size}"
    if notes:
        more = f", +{len(notes) - 3} more" if len(notes) > 3 else ""
        description += f" ({', '.join(notes[:3])}{more})"
    return {**default, **exceptions}, description


def _num_parameters(model: nn.Module) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def _write_model_dir(
    gguf: Path, metadata: dict[str, Any], model: nn.Module, config: dict[str, Any], tmp: Path
) -> None:
    from mlx_lm.utils import save_config, save_model

    from worker.gguf_tokenizer import write_tokenizer

    tmp.mkdir(parents=True)
    specials = write_tokenizer(gguf, metadata, tmp)
    if specials.bos is not None:
        config["bos_token_id"] = specials.bos
    if eos := specials.eos_ids:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    save_model(tmp, model)
    save_config(dict(config), config_path=tmp / "config.json")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory into place, so OUT_DIR never holds half a model."""
    from shared.fsutil import fsync_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # rename() may replace an empty directory
    else:  # --force: drop the old model files (a stale shard would be loaded), keep the rest
        for pattern in _MODEL_FILE_GLOBS:
            for old in out_dir.glob(pattern):
                old.unlink()
        for new in tmp.iterdir():
            os.replace(new, out_dir / new.name)
    fsync_dir(out_dir.parent)
