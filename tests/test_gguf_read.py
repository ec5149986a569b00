"""worker/gguf_read.py: a GGUF file read by `gguf.GGUFReader`, every unreadable file refused in
one line.

Files are written with `gguf.GGUFWriter` (or byte by byte, for the malformed ones); expected
values are literals.

    .venv/bin/python -m pytest -q tests/test_gguf_read.py
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from shared.errors import DataError
from tests.conftest import overnight
from worker.gguf_read import read_gguf


def write(path: Path, alignment: int | None = None) -> None:
    """Every metadata value type; tensors F32 (3 x 5), F16 (7), Q4_K (2 x 256), Q8_0 (4 x 64)."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.strs", ["Ġthe", "<|im_end|>", "ü"])
    w.add_array("t.ints", [3, 1, 4, 1, 5])
    w.add_array("t.floats", [0.5, -2.25])
    w.add_tensor("f32", np.arange(15, dtype=np.float32).reshape(3, 5))
    w.add_tensor("f16", np.arange(7, dtype=np.float16))
    w.add_tensor("q4k", (np.arange(288) % 256).astype(np.uint8).reshape(2, 144), raw_dtype=T.Q4_K)
    w.add_tensor("q8", gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_is_plain_python_and_tensors_are_views(tmp_path: Path, alignment) -> None:
    path = tmp_path / "all.gguf"
    write(path, alignment)
    tensors, md = read_gguf(path)
    assert md == {
        "general.architecture": "llama",
        **({"general.alignment": 64} if alignment else {}),
        "t.u8": 200, "t.i8": -100, "t.u16": 60000, "t.i16": -30000, "t.u32": 4_000_000_000,
        "t.i32": -2_000_000_000, "t.f32": 9.999999747378752e-06, "t.u64": 2**63 + 5,
        "t.i64": -(2**62), "t.f64": 0.1, "t.bool": True, "t.str": "héllo ✓",
        "t.strs": ["Ġthe", "<|im_end|>", "ü"], "t.ints": [3, 1, 4, 1, 5],
        "t.floats": [0.5, -2.25],
    }  # fmt: skip
    assert all(type(v) in (int, float, bool, str, list) for v in md.values())
    assert md["t.bool"] is True and type(md["t.u64"]) is int
    assert list(tensors) == ["f32", "f16", "q4k", "q8"]
    shapes = {n: (t.type_name, t.shape, t.data.dtype, t.data.shape) for n, t in tensors.items()}
    assert shapes == {
        "f32": ("F32", (3, 5), np.float32, (3, 5)),
        "f16": ("F16", (7,), np.float16, (7,)),
        "q4k": ("Q4_K", (2, 256), np.uint8, (2, 144)),  # 256 values = one 144-byte block a row
        "q8": ("Q8_0", (4, 64), np.uint8, (4, 68)),  # two 34-byte blocks a row
    }
    assert np.array_equal(tensors["f32"].data[2], [10, 11, 12, 13, 14])
    assert tensors["q4k"].data[1, 0] == 144 and tensors["q4k"].data[1, -1] == 31
    assert not tensors["f32"].data.flags.writeable, "a view of the file, not a copy"
    assert type(tensors["f32"].data) is np.ndarray, "no np.memmap subclass leaks out"


def test_empty_arrays_and_a_file_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(header(n_kv=2) + kv("a", 9, struct.pack("<IQ", 8, 0)) + STR)
    assert read_gguf(path) == ({}, {"a": [], "k": "x"})


# ---------------------------------------------------------------- refused, in one line


def header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key: str, vtype: int, value: bytes) -> bytes:
    """One metadata entry: key, value type, value bytes."""
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + value


def tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int = 0) -> bytes:
    n = name.encode()
    return struct.pack(f"<Q{len(n)}sI{len(dims)}QIQ", len(n), n, len(dims), *dims, type_id, offset)


ONE_TENSOR = header(n_tensors=1)  # a file with one tensor and no metadata
STR = kv("k", 8, struct.pack("<Q", 1) + b"x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"expected a GGUF file, it has no GGUF header"),
        (b"GGUF\x03\x00\x00", r"expected a GGUF file, it has no GGUF header"),
        (b"GGML" + bytes(40), r"expected a GGUF file, it does not start with 'GGUF'"),
        (header(version=1), r"GGUF version 1 is not supported \(2 and 3 are\)"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), r"a big-endian GGUF file; only little-endian"),
        (header(n_tensors=1, n_kv=1) + STR[:-1],
         r"the file ends inside metadata k at offset 45 of 45 bytes: an incomplete download"),
        (header(n_kv=1) + kv("k", 8, struct.pack("<Q", 1) + b"\xff"), r"metadata k is not UTF-8"),
        (header(n_kv=1) + kv("k", 77, b""), r"metadata k has value type 77, unknown to gguf"),
        (header(n_kv=1) + kv("k", 9, struct.pack("<IQ", 8, 2**40)), r"ends inside metadata k"),
        (header(n_kv=1) + kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 77, 1)),
         r"metadata k has value type 77"),
        (header(n_kv=2) + STR + STR, r"metadata key k appears twice"),
        (header(n_kv=1) + struct.pack("<Q", 1) + b"\xff" + struct.pack("<IB", 0, 1),
         r"a metadata key at offset 24 is not UTF-8 text"),
        (header(n_kv=1) + kv("general.alignment", 4, struct.pack("<I", 48)),
         r"general.alignment must be a power of two, got 48"),
        (header(n_kv=1) + kv("general.alignment", 10, struct.pack("<Q", 64)),
         r"general.alignment must be a uint32"),
        (header(n_kv=2**60), r"ends inside a metadata key at offset 24 of 24 bytes"),
        (ONE_TENSOR + struct.pack("<Q", 1) + b"t",
         r"ends inside the tensor table \(tensor t\) at offset 33"),
        (ONE_TENSOR + tensor_info("t", (1,) * 7, 0) + bytes(64),
         r"tensor t has 7 dimensions \(1 to 4 expected\)"),
        (ONE_TENSOR + tensor_info("t", (), 0) + bytes(64),
         r"tensor t has 0 dimensions \(1 to 4 expected\)"),
        (ONE_TENSOR + tensor_info("t", (1,) * 7, 0) + bytes(7),
         r"tensor t has 7 dimensions \(1 to 4 expected\)"),
        (ONE_TENSOR + tensor_info("t", (100,), 12) + bytes(4096),
         r"tensor t \(Q4_K\) has rows of 100 values, not a multiple of its block size 256"),
        (header(n_tensors=2) + tensor_info("t", (8,), 0) + tensor_info("t", (8,), 0, 32)
         + bytes(96),
         r"tensor t appears twice in the tensor table"),
        (ONE_TENSOR + tensor_info("t", (64,), 0) + bytes(64 - 57 + 255),
         r"tensor t ends 1 bytes past the end of the file: an incomplete download"),
    ],
    ids=["empty", "short-header", "magic", "v1", "big-endian", "cut-string", "not-utf8",
         "value-type", "huge-array", "nested-value-type", "duplicate-key", "key-not-utf8",
         "alignment", "alignment-type", "huge-kv-count", "cut-table", "dims", "dims-0", "dims-cut",
         "block",
         "duplicate-tensor", "cut-data"],
)  # fmt: skip
def test_unreadable_files_are_one_line_data_errors(tmp_path: Path, content, message) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{tmp_path}/bad\.gguf: .*{message}") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_file_cut_anywhere_is_refused_as_an_incomplete_file(tmp_path: Path) -> None:
    """An interrupted download, cut at every byte of the header, metadata and tensor table and
    at a few places in the tensor data: one line each, never a bare numpy error."""
    write(tmp_path / "all.gguf")
    data = (tmp_path / "all.gguf").read_bytes()
    q8_end = len(data) - 288 + 272  # the last tensor (Q8_0, 272 bytes) is padded to 288
    tensor_data = len(data) - 64 - 32 - 288 - 288  # f32 60 bytes + 4 padding, f16 14 + 18, ...
    cuts = [*range(0, tensor_data + 1), tensor_data + 63, len(data) - 200, q8_end - 1]
    expected = r"no GGUF header|ends inside|past the end of the file: an incomplete download"
    for cut in cuts:
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(DataError, match=expected) as e:
            read_gguf(tmp_path / "cut.gguf")
        assert "\n" not in str(e.value), cut
    (tmp_path / "cut.gguf").write_bytes(data[:q8_end])  # only the padding after the last tensor
    assert read_gguf(tmp_path / "cut.gguf")[0]["q8"].data.shape == (4, 68)


@pytest.mark.parametrize(
    ("type_id", "message"),
    [
        (36, r"type id 36 \(IQ4_NL_4_4, removed from llama\.cpp\), unknown to gguf \d+\.\d+"),
        (4, r"type id 4 \(Q4_2, removed from llama\.cpp\)"),
        (200, r"type id 200, unknown to gguf \d+\.\d+\S*: the file needs a newer importer"),
    ],
)
def test_unknown_tensor_type_is_refused_naming_the_tensor(tmp_path: Path, type_id, message):
    """gguf.GGUFReader stops at a type id it does not know with "36 is not a valid
    GGMLQuantizationType"; the refusal names the tensor."""
    path = tmp_path / "old.gguf"
    write(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"q4k") + 3 + 4 + 2 * 8  # name, n_dims, 2 dims, then the type
    assert data[at : at + 4] == struct.pack("<I", 12), "Q4_K"
    data[at : at + 4] = struct.pack("<I", type_id)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"old\.gguf: tensor q4k has {message}") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_big_endian_file_with_tensors_is_refused(tmp_path: Path) -> None:
    """gguf.GGUFReader reads big-endian files; we refuse them (block types' scales)."""
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DataError, match=r"be\.gguf: a big-endian GGUF file; only little-endian"):
        read_gguf(tmp_path / "be.gguf")


def test_unreadable_file_is_a_one_line_data_error(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()  # as good as a file without read permission, also as root
    with pytest.raises(DataError, match=r"dir\.gguf: cannot read it \(Is a directory\)"):
        read_gguf(tmp_path / "dir.gguf")


def test_command_refuses_a_truncated_file_with_one_line_and_exit_78(tmp_path: Path) -> None:
    write(tmp_path / "all.gguf")
    data = (tmp_path / "all.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-300])
    done = overnight("import-gguf", str(tmp_path / "cut.gguf"), str(tmp_path / "out"))
    assert done.returncode == 78, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cut.gguf: tensor q4k ends 12 bytes past the end of the file" in done.stderr
    assert not (tmp_path / "out").exists()
