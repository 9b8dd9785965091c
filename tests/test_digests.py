"""Snapshot files hashed in pieces, and the safetensors files paddlerun streams itself."""
import ctypes
import errno
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from paddlerun.trainer.checkpoint import CheckpointStore, inspect_snapshot, read_tensors, write_tensors
from paddlerun.trainer.checkpoint import atomic, digests, manifest as mf
from paddlerun.trainer.checkpoint.atomic import FileRecord, write_views
from paddlerun.trainer.checkpoint.digests import PIECE, ViewHasher, hash_bytes, hash_file, piece_count
from paddlerun.trainer.checkpoint.errors import CheckpointError


def pieces_by_hand(data: bytes, piece: int):
    return tuple(hashlib.sha256(data[i:i + piece]).hexdigest()
                 for i in range(0, max(len(data), 1), piece))


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4000, 4321])
def test_pieces_are_the_sha256_of_each_slice_and_one_piece_is_the_plain_sha256(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    want = pieces_by_hand(data, 1000)
    assert len(want) == piece_count(size, 1000)
    assert hash_file(path, piece=1000) == (size, want)
    assert hash_file(path, piece=1000, threads=1) == (size, want)
    assert hash_bytes(data, piece=1000) == want
    assert hash_file(path) == (size, (hashlib.sha256(data).hexdigest(),))  # what sha256sum prints


def test_views_are_hashed_as_the_file_they_make_across_their_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    for sizes in ((3, 1500, 0, 700, 997), (1000, 1000, 500), (1000, 2000)):  # ends on a piece's end
        views = [memoryview(rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for n in sizes]
        data = b"".join(views)
        # min_parallel=0: the pieces go to threads even though they are tiny.
        hasher = ViewHasher(views, piece=1000, threads=2, min_parallel=0)
        assert hasher.digests() == pieces_by_hand(data, 1000), sizes
        assert ViewHasher(views, piece=1000).digests() == pieces_by_hand(data, 1000), sizes  # inline


def test_a_failed_write_names_the_file_and_leaves_no_hashing_thread():
    before = threading.active_count()
    with pytest.raises(OSError, match="writing /dev/full"):  # ENOSPC on the first write
        write_views(Path("/dev/full"), [memoryview(bytes(16 << 20))])
    assert threading.active_count() == before


def test_hashing_threads_run_nicer_than_the_thread_that_writes(monkeypatch):
    # Measured: with 3 threads on 2 cores, the write waiting behind the hashing cost 1.5 x.
    seen = []

    def noting_its_priority(parts):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return hashlib.sha256(b"".join(parts)).hexdigest()

    monkeypatch.setattr(digests, "_sha256_of", noting_its_priority)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    data = np.zeros(6 * (1 << 20), dtype=np.uint8)  # over min_parallel: threads hash it
    got = ViewHasher([memoryview(data)], piece=1 << 20).digests()
    assert got == (hashlib.sha256(bytes(1 << 20)).hexdigest(),) * 6
    assert seen == [min(19, before + digests.HASH_NICE)] * 6
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_short_writes_are_resumed_where_they_stopped(tmp_path, monkeypatch):
    real_writev = os.writev
    calls = []

    def at_most_7_bytes(fd, parts):  # what write(2) may do (a signal, a full disk's last bytes)
        calls.append(len(parts))
        return os.write(fd, b"".join(bytes(p) for p in parts)[:7])

    views = [memoryview(b"header"), memoryview(np.arange(10, dtype=np.int32)), memoryview(b"!")]
    monkeypatch.setattr(os, "writev", at_most_7_bytes)
    record = write_views(tmp_path / "f", views)
    monkeypatch.setattr(os, "writev", real_writev)
    want = b"header" + np.arange(10, dtype=np.int32).tobytes() + b"!"
    assert (tmp_path / "f").read_bytes() == want and record.size == len(want)
    assert len(calls) == -(-len(want) // 7)


def test_more_arrays_than_one_writev_takes(tmp_path):
    arrays = {f"b{i}": np.full(3, i, dtype=np.int16) for i in range(1500)}  # IOV_MAX is 1024
    write_tensors(tmp_path / "many.safetensors", arrays)
    got = read_tensors(tmp_path / "many.safetensors")
    assert len(got) == 1500 and all(np.array_equal(got[k], v) for k, v in arrays.items())


def test_one_digest_is_of_the_whole_file_however_big_as_format_version_1_wrote_it(tmp_path):
    data = bytes(range(256)) * 10
    (tmp_path / "f").write_bytes(data)
    whole = FileRecord("f", len(data), (hashlib.sha256(data).hexdigest(),), piece_bytes=1000)
    assert whole.hashed_in == len(data)
    assert whole.mismatch_of_file(tmp_path / "f") is None
    pieces = FileRecord("f", len(data), pieces_by_hand(data, 1000), piece_bytes=1000)
    assert pieces.mismatch_of_file(tmp_path / "f") is None
    assert "3 sha256 pieces where the manifest has 1" in whole.mismatch(len(data), pieces.sha256)


def test_write_views_records_what_it_wrote(tmp_path):
    views = [memoryview(b"header"), memoryview(np.arange(1000, dtype=np.float64))]
    record = write_views(tmp_path / "f", views)
    data = (tmp_path / "f").read_bytes()
    assert data == b"header" + np.arange(1000, dtype=np.float64).tobytes()
    assert record == FileRecord("f", len(data), (hashlib.sha256(data).hexdigest(),))
    assert record.mismatch_of_file(tmp_path / "f") is None


ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64": np.linspace(0, 1, 7),
    "f16": np.array([1.5, -2.0], dtype=np.float16),
    "bf16_as_u16": np.array([16256, 49024], dtype=np.uint16),  # Paddle's bfloat16 reaches numpy as uint16
    "i64": np.array([-(2 ** 40), 3], dtype=np.int64),
    "i32": np.array([[1], [2]], dtype=np.int32),
    "i16": np.array([-7], dtype=np.int16),
    "i8": np.array([-1, 1], dtype=np.int8),
    "u8": np.array([255], dtype=np.uint8),
    "u32": np.array([2 ** 31], dtype=np.uint32),
    "u64": np.array([2 ** 63], dtype=np.uint64),
    "bool": np.array([True, False, True]),
    "scalar": np.array(2.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, 1:3],
    "big_endian": np.arange(5, dtype=">i4"),
}


def test_streamed_files_read_back_through_the_library_as_its_own_do(tmp_path):
    ours = tmp_path / "ours.safetensors"
    write_tensors(ours, ARRAYS, metadata={"kind": "test"})
    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file({k: v if v.flags.c_contiguous else np.ascontiguousarray(v)
                                 for k, v in ARRAYS.items()}, theirs,
                                metadata={"kind": "test"})
    for path in (ours, theirs):
        with safe_open(path, framework="np") as f:
            assert f.metadata() == {"kind": "test"}
            got = {name: f.get_tensor(name) for name in f.keys()}
        assert set(got) == set(ARRAYS)
        for name, want in ARRAYS.items():
            assert got[name].shape == want.shape, name
            assert got[name].dtype == want.dtype.newbyteorder("="), name
            assert np.array_equal(got[name], want), name
    header_length = int.from_bytes(ours.read_bytes()[:8], "little")
    assert header_length % 8 == 0  # the data starts aligned, as the library's does


@pytest.mark.parametrize("arrays, says", [
    ({"c": np.array([1j])}, "complex128, which safetensors does not store"),
    ({"o": np.array([object()])}, "object, which safetensors does not store"),
    ({"__metadata__": np.zeros(1)}, "'__metadata__'"),
    ({"l": [1, 2]}, "must be a str name"),
])
def test_what_safetensors_cannot_hold_is_refused_naming_the_entry(tmp_path, arrays, says):
    with pytest.raises(CheckpointError, match=says):
        write_tensors(tmp_path / "x.safetensors", arrays)
    assert not (tmp_path / "x.safetensors").exists()


def test_records_of_several_pieces_round_trip_and_are_checked():
    record = FileRecord("m", 2 * PIECE + 1, ("a" * 64, "b" * 64, "c" * 64))
    entry = record.to_json()
    assert entry == {"name": "m", "size": 2 * PIECE + 1, "piece_bytes": PIECE,
                     "sha256_pieces": ["a" * 64, "b" * 64, "c" * 64]}
    assert FileRecord.from_json(entry) == record
    with pytest.raises(ValueError, match="has 2 sha256_pieces for .* it needs 3"):
        FileRecord.from_json({**entry, "sha256_pieces": ["a" * 64] * 2})
    with pytest.raises(ValueError, match="invalid piece_bytes 0"):
        FileRecord.from_json({**entry, "piece_bytes": 0})
    with pytest.raises(ValueError, match="invalid sha256_pieces"):
        FileRecord.from_json({**entry, "sha256_pieces": ["A" * 64] * 3})
    with pytest.raises(ValueError, match="both a sha256 and sha256_pieces"):
        FileRecord.from_json({**entry, "sha256": "a" * 64})
    assert record.mismatch(2 * PIECE + 1, ("a" * 64, "d" * 64, "c" * 64)) == (
        f"sha256 of bytes {PIECE}-{2 * PIECE - 1} dddddddddddddddd... does not match the "
        f"manifest's bbbbbbbbbbbbbbbb...")


def test_a_manifest_is_version_1_unless_a_file_needs_pieces():
    small = FileRecord("a", 3, ("a" * 64,))
    big = FileRecord("b", PIECE + 1, ("a" * 64, "b" * 64))
    assert mf.build(1, [small], {})["format_version"] == 1  # still readable by older paddleruns
    v2 = mf.build(1, [small, big], {})
    assert v2["format_version"] == 2
    assert mf.parse(mf.dumps(v2), 1)["files"][1]["sha256_pieces"] == ["a" * 64, "b" * 64]
    with pytest.raises(ValueError, match="is format_version 1 but records 'b' in sha256_pieces"):
        mf.parse(mf.dumps({**v2, "format_version": 1}), 1)
    for version in (3, 1.0, True, "2"):
        with pytest.raises(ValueError, match="this paddlerun reads versions 1, 2"):
            mf.parse(mf.dumps({**v2, "format_version": version}), 1)


def test_a_snapshot_file_of_several_pieces_commits_verifies_and_names_a_corrupt_piece(tmp_path):
    big = np.arange(PIECE // 4 + 1000, dtype=np.float32)  # just over one piece: two digests
    store = CheckpointStore(tmp_path / "ckpt")
    # Written by "another rank": the committer takes it by its done mark and hashes it again.
    store.stage(7).write_tensors("model.safetensors", {"w": big})
    committer = store.stage(7, publish_marks=False)
    committer.write_json("state.json", {"step": 7})
    path = store.commit(committer, {}, expect_files=["model.safetensors"], wait_timeout_s=10)
    info = inspect_snapshot(path)
    assert info.complete and info.manifest["format_version"] == 2
    entry = info.manifest["files"][0]
    assert len(entry["sha256_pieces"]) == 2 and entry["piece_bytes"] == PIECE
    data = (path / "model.safetensors").read_bytes()
    assert entry["sha256_pieces"] == list(pieces_by_hand(data, PIECE))
    assert np.array_equal(info.read_tensors("model.safetensors")["w"], big)

    # The same snapshot as the version before wrote it (format_version 1, one sha256 of
    # the whole file) is complete and restores: a resume after the upgrade finds it.
    as_written = (path / "manifest.json").read_text()
    manifest = json.loads(as_written)
    del manifest["files"][0]["sha256_pieces"], manifest["files"][0]["piece_bytes"]
    manifest["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    old = inspect_snapshot(path)
    assert old.complete, old.problem
    assert np.array_equal(old.read_tensors("model.safetensors")["w"], big)
    assert old.read_bytes("model.safetensors") == data
    (path / "manifest.json").write_text(as_written)

    with open(path / "model.safetensors", "r+b") as f:  # one byte of the second piece
        f.seek(PIECE + 5)
        f.write(bytes([data[PIECE + 5] ^ 0xFF]))
    info = inspect_snapshot(path)
    assert info.state == "corrupt"
    assert info.problem.startswith(f"model.safetensors: sha256 of bytes {PIECE}-{len(data) - 1} ")
    assert inspect_snapshot(path, verify=False).complete  # sizes alone cannot tell
    with pytest.raises(CheckpointError, match="is corrupt: sha256 of bytes"):
        read_tensors(path / "model.safetensors", expected=FileRecord.from_json(entry))
    assert json.loads((path / "manifest.json").read_text())["step"] == 7


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range(2) is Linux's")
def test_early_writeback_reaches_the_kernel_and_takes_any_range(tmp_path):
    assert atomic._sync_file_range is not None  # else big persists would silently lose ~35 %
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        # The call itself, with its argument types: 0 for a good range, EINVAL for a bad flag.
        assert atomic._sync_file_range(f.fileno(), 0, 10000, atomic._SYNC_FILE_RANGE_WRITE) == 0
        assert atomic._sync_file_range(f.fileno(), 0, 10000, 1 << 20) == -1
        assert ctypes.get_errno() == errno.EINVAL
        atomic.start_writeback(f.fileno(), 8192, 1 << 30)  # past the end: a hint, no error
