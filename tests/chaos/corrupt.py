"""Damage a checkpoint on disk the ways disks, people and bugs do (shared/checkpoint.py's
contract: a checkpoint is its manifest's files, each of the listed size and sha256).

| variant        | what is done                                                | manifest   |
|----------------|-------------------------------------------------------------|------------|
| truncate       | a data file cut to a random shorter length                  | stale      |
| bitflip        | one random bit of one data file flipped (size unchanged)    | stale      |
| no_manifest    | manifest.json deleted (what an interrupted write leaves)    | gone       |
| wrong_hash     | one file's sha256 in the manifest replaced by another hash  | wrong      |
| nan            | one adapter/optimizer value set to NaN                      | consistent |
| missing_tensor | one tensor removed from adapters.safetensors                | consistent |
| wrong_shape    | one adapter tensor's shape transposed (same bytes)          | consistent |
| config         | trainer_state.json's config changed (seed, config_hash)     | consistent |

The last four have a *valid* manifest: only a validator that reads the values (non-finite),
or checks the checkpoint against what the worker builds (tensor names and shapes, config),
can refuse them — issue 12: "validator and worker must agree".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from tests.chaos.tensorfile import NAN_BYTES, TensorFile

VARIANTS = ("truncate", "bitflip", "no_manifest", "wrong_hash", "nan", "missing_tensor",
            "wrong_shape", "config")
DATA_FILES = ("adapters.safetensors", "optimizer.safetensors", "trainer_state.json")
MANIFEST = "manifest.json"


def newest_complete(checkpoints: Path) -> Path | None:
    """The newest `step-NNNNNNN` directory with a manifest (what the supervisor would pick)."""
    found = sorted(p for p in checkpoints.glob("step-*") if (p / MANIFEST).is_file())
    return found[-1] if found else None


def unrenamed(checkpoints: Path) -> list[tuple[Path, Path]]:
    """(temp dir, its step dir) for each checkpoint complete but for its rename — a kill
    between the manifest and the rename — whose step dir is missing: the supervisor puts
    it in place before the next start (shared.checkpoint.clean_leftovers), so it, not the
    newest `step-*` of the moment, is what the next checkpoint choice sees first."""
    out = []
    for tmp in sorted(checkpoints.glob(".tmp-step-*")):
        final = checkpoints / tmp.name.removeprefix(".tmp-").rsplit("-", 1)[0]
        if (tmp / MANIFEST).is_file() and not final.exists():
            out.append((tmp, final))
    return out


def corrupt(path: Path, variant: str, rng: random.Random) -> str:
    """Damage the checkpoint directory `path`; returns what was done (one line)."""
    if variant == "no_manifest":
        (path / MANIFEST).unlink()
        _sync(path)
        return "deleted manifest.json"
    if variant == "truncate":
        name = rng.choice(DATA_FILES)
        f = path / name
        size = f.stat().st_size
        keep = rng.randrange(0, size)
        os.truncate(f, keep)
        _sync(f)
        return f"truncated {name} from {size} to {keep} bytes"
    if variant == "bitflip":
        name = rng.choice(DATA_FILES)
        f = path / name
        data = bytearray(f.read_bytes())
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        f.write_bytes(bytes(data))
        _sync(f)
        return f"flipped bit {bit} of {name}"
    if variant == "wrong_hash":
        manifest = json.loads((path / MANIFEST).read_text())
        name = rng.choice(sorted(manifest["files"]))
        manifest["files"][name]["sha256"] = hashlib.sha256(os.urandom(16)).hexdigest()
        _write(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return f"manifest: wrong sha256 for {name}"
    what = _consistent(path, variant, rng)
    _rewrite_manifest(path)
    return what + " (manifest rewritten: hashes and sizes valid)"


def _consistent(path: Path, variant: str, rng: random.Random) -> str:
    if variant == "nan":
        name = rng.choice(("adapters.safetensors", "optimizer.safetensors"))
        tf = TensorFile.read(path / name)
        tensor = rng.choice(tf.float_names())
        info = tf.header[tensor]
        nan = NAN_BYTES[info["dtype"]]
        raw = bytearray(tf.raw(tensor))
        i = rng.randrange(len(raw) // len(nan)) * len(nan)
        raw[i:i + len(nan)] = nan
        tf.replace(tensor, bytes(raw))
        tf.write(path / name)
        return f"NaN at element {i // len(nan)} of {tensor} in {name}"
    if variant == "missing_tensor":
        tf = TensorFile.read(path / "adapters.safetensors")
        tensor = rng.choice(sorted(tf.header))
        tf.drop(tensor)
        tf.write(path / "adapters.safetensors")
        return f"removed tensor {tensor} from adapters.safetensors"
    if variant == "wrong_shape":
        tf = TensorFile.read(path / "adapters.safetensors")
        candidates = [k for k, v in tf.header.items()
                      if len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1]]
        tensor = rng.choice(sorted(candidates))
        info = dict(tf.header[tensor])
        info["shape"] = list(reversed(info["shape"]))
        tf.replace(tensor, tf.raw(tensor), info)
        tf.write(path / "adapters.safetensors")
        return f"{tensor}: shape {list(reversed(info['shape']))} -> {info['shape']}"
    if variant == "config":
        f = path / "trainer_state.json"
        state = json.loads(f.read_text())
        state["config"]["seed"] = int(state["config"].get("seed", 0)) + 1
        state["config_hash"] = hashlib.sha256(b"tampered" + os.urandom(8)).hexdigest()[:16]
        _write(f, json.dumps(state, indent=2).encode())
        return "trainer_state.json: config seed and config_hash changed"
    raise ValueError(f"expected a variant in {VARIANTS}, got {variant!r}")


def _rewrite_manifest(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}
    _write(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    _sync(path)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
