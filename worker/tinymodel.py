"""A tiny random llama model and a small corpus, built offline in seconds.

Used by `overnight demo` (through `overnight tiny-model DIR`, a worker command: the
supervisor runs worker code only as a process), the tests and the benchmarks: a real mlx_lm
model directory (config.json, model.safetensors, tokenizer.json with a chat template) that
`mlx_lm.load`, `mlx_lm generate` and `mlx_lm fuse` accept, but small enough to train on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

_SUBJECTS = ["the fox", "a robot", "my cat", "the river", "an owl", "the train", "a child"]
_VERBS = ["jumps over", "looks at", "runs past", "sings to", "waits for", "follows"]
_OBJECTS = ["the lazy dog", "a red ball", "the old bridge", "the moon", "a quiet town"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        + (f" and {rng.choice(_OBJECTS)}" if rng.random() < 0.5 else "")
        for _ in range(n)
    ]


def make_tokenizer(out: Path, corpus: list[str], vocab_size: int = 384) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "</s>",
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    return int(tok.get_vocab_size())


def make_tiny_model(
    out: Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    quantize_bits: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random llama model directory; `quantize_bits=4` gives a QLoRA base."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out, sentences(400, seed=1))
    config: dict = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": hidden_size * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantize_bits is not None:
        group_size = 32
        nn.quantize(model, group_size=group_size, bits=quantize_bits)
        config["quantization"] = {"group_size": group_size, "bits": quantize_bits}
        config["quantization_config"] = config["quantization"]
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_corpus(
    out: Path,
    n_train: int = 256,
    n_valid: int = 32,
    fmt: str = "text",
    seed: int = 0,
    weights: bool = False,
) -> Path:
    """Write train.jsonl / valid.jsonl in one of mlx_lm's formats: text, completions, chat."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def record(s: str) -> dict:
        head, _, tail = s.partition(" ")
        if fmt == "text":
            r: dict = {"text": s}
        elif fmt == "completions":
            r = {"prompt": head, "completion": tail}
        elif fmt == "chat":
            r = {
                "messages": [
                    {"role": "user", "content": head},
                    {"role": "assistant", "content": tail},
                ]
            }
        else:
            raise ValueError(f"unknown corpus format {fmt!r}")
        if weights:
            r["auth_weight"] = round(rng.uniform(0.0, 0.99), 3)
            r["prov_entropy"] = round(rng.uniform(0.0, 3.0), 3)
        return r

    for name, n, s in (("train", n_train, seed + 10), ("valid", n_valid, seed + 20)):
        if n == 0:
            continue
        lines = [json.dumps(record(x)) for x in sentences(n, seed=s)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="writes DIR/model and DIR/data (kept if there)")
    parser.add_argument("--n-train", type=int, default=512, help="training examples")
    parser.add_argument("--n-valid", type=int, default=32, help="validation examples")


def main(args: argparse.Namespace) -> int:
    """`overnight tiny-model DIR`: the model and corpus `overnight demo` trains."""
    if not (args.dir / "model" / "config.json").exists():
        make_tiny_model(args.dir / "model")
    if not (args.dir / "data" / "train.jsonl").exists():
        make_corpus(args.dir / "data", n_train=args.n_train, n_valid=args.n_valid)
    print(f"model: {args.dir / 'model'}\ndata:  {args.dir / 'data'}")
    return 0
