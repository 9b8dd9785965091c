"""Chaos suite, bad input: configs and snapshots that are wrong, and what paddlerun does with them.

Three tables:

- **Configs through the real command line** (``python -m paddlerun.launcher.cli run``, each
  in its own process): exit 2, a message naming the key, path or line, no worker started,
  nothing written, no process left, and paddle never imported by the supervisor.
  ``test_config.py`` checks the same loader in-process; this is what a user sees.
- **Snapshots against the store** (paddle-free): lies and tricks beyond
  ``test_checkpoint_store.py``'s corruption table -- safetensors headers that lie about
  offsets or length, zero-length and truncated files whose manifest was rewritten to match,
  manifests naming paths outside the snapshot with a size and sha256 that match the outside
  file, symlinks out of the snapshot, a FIFO. The reader must refuse them naming the file,
  fall back to the older snapshot, never block, and never open the file outside (watched
  with inotify).
- **Snapshots against the real restore path** (``Checkpointer.restore`` with real paddle, in
  this process), and end to end through ``paddlerun run`` (``slow``): a rerun skips a
  snapshot whose header lies, resumes from the older one, and replaces the bad one when it
  saves that step again.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pytest

from helpers import REPO, assert_no_leftovers, processes_of, run, summary
from paddlerun.trainer.checkpoint import CheckpointError, CheckpointStore, SnapshotInfo, write_tensors
from paddlerun.trainer.checkpoint.digests import hash_file

LOGGER = "paddlerun.checkpoint"


# ====================================================================== configs, real CLI

def cli_run(config: Path, run_dir: Path, *sets: str, timeout: float = 120):
    """``python -X importtime -m paddlerun.launcher.cli run CONFIG --run-dir RUN_DIR``.

    ``-X importtime`` makes the interpreter list every module it imports on stderr: the
    proof that the supervisor never imported paddle. Returns (result, message, imported).
    """
    argv = [sys.executable, "-X", "importtime", "-m", "paddlerun.launcher.cli", "run",
            str(config), "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    imported, message = set(), []
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[-1].strip())
        else:
            message.append(line)
    return result, "\n".join(message), imported


@dataclasses.dataclass(frozen=True)
class BadConfig:
    id: str
    text: str                # the YAML file; {tmp} is the test's tmp_path
    expected: str            # a fragment of the message, naming the key, path or line
    sets: tuple = ()         # --set overrides
    raw: Optional[bytes] = None  # the file's bytes, when not text
    #: Loader errors name the config file too; the preflight checks (paths, imports) name
    #: the key and the path or import string only.
    names_file: bool = True


BAD_CONFIGS = [
    # unknown keys
    BadConfig("unknown-key", "train:\n  lr: 0.1\n  epoch: 3\n",
              "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    BadConfig("unknown-section", "trainer:\n  lr: 0.1\n",
              "unknown key 'trainer'; did you mean 'train'?"),
    BadConfig("unknown-key-nested", "checkpoint:\n  every_step: 10\n",
              "unknown key 'checkpoint.every_step'; did you mean 'checkpoint.every_steps'?"),
    BadConfig("unknown-key-via-set", "train: {}\n",
              "--set: unknown key 'supervisor.max_restart'; did you mean 'supervisor.max_restarts'?",
              sets=("supervisor.max_restart=2",)),
    # wrong types
    BadConfig("wrong-type-number", "train:\n  lr: fast\n", "train.lr must be a number, got 'fast'"),
    BadConfig("wrong-type-float-for-int", "checkpoint:\n  keep_last: 2.5\n",
              "checkpoint.keep_last must be an integer, got 2.5"),
    BadConfig("wrong-type-bool-for-int", "supervisor:\n  max_restarts: yes\n",
              "supervisor.max_restarts must be an integer, got True"),
    BadConfig("wrong-type-string-for-list", "supervisor:\n  preempt_signals: SIGTERM\n",
              "supervisor.preempt_signals must be a list, got 'SIGTERM'"),
    BadConfig("wrong-type-section", "checkpoint: 10\n", "checkpoint must be a mapping, got int 10"),
    BadConfig("wrong-type-via-set", "train: {}\n",
              "train.epochs must be an integer, got 'three'", sets=("train.epochs=three",)),
    # negative or zero counts
    BadConfig("negative-batch", "train:\n  global_batch_size: -64\n",
              "train.global_batch_size must be >= 1, got -64"),
    BadConfig("zero-epochs", "train:\n  epochs: 0\n", "train.epochs must be >= 1, got 0"),
    BadConfig("negative-workers", "train:\n  num_workers: -2\n", "train.num_workers must be >= 0, got -2"),
    BadConfig("negative-max-steps-via-set", "train: {}\n",
              "train.max_steps must be >= 1 or null, got -5", sets=("train.max_steps=-5",)),
    BadConfig("zero-every-steps", "checkpoint:\n  every_steps: 0\n",
              "checkpoint.every_steps must be >= 1 or null, got 0"),
    BadConfig("negative-max-restarts", "supervisor:\n  max_restarts: -1\n",
              "supervisor.max_restarts must be >= 0, got -1"),
    BadConfig("zero-workers", "launch:\n  nproc_per_node: 0\n",
              "launch.nproc_per_node must be a positive integer or 'auto', got 0"),
    BadConfig("zero-hang-timeout", "supervisor:\n  hang_timeout_s: 0\n",
              "supervisor.hang_timeout_s must be > 0, got 0"),
    # values that used to pass the loader and fail later (a traceback, or workers that start)
    BadConfig("unknown-signal-via-set", "train: {}\n",
              "supervisor.preempt_signals[0] 'SIGFOO' is not a signal name; use names such as SIGTERM",
              sets=("supervisor.preempt_signals=[SIGFOO]",)),
    BadConfig("uncatchable-signal", "supervisor:\n  preempt_signals: [SIGTERM, SIGKILL]\n",
              "supervisor.preempt_signals[1] 'SIGKILL' is a signal no process can catch"),
    BadConfig("batch-not-divisible-via-set", "launch:\n  nproc_per_node: 2\n",
              "train.global_batch_size=63 is not divisible by the 2 workers (launch.nproc_per_node=2 "
              "-> 2 per node x launch.nnodes=1); set train.global_batch_size to a multiple of 2 (62, 64)",
              sets=("train.global_batch_size=63",), names_file=False),
    BadConfig("batch-not-divisible-multinode",
              "launch:\n  nproc_per_node: 2\n  nnodes: 2\n  master: 127.0.0.1:1\ntrain:\n"
              "  global_batch_size: 66\n",
              "train.global_batch_size=66 is not divisible by the 4 workers", names_file=False),
    BadConfig("extra-args-repeat-a-flag", "launch:\n  extra_args: [--log_level, DEBUG, --nproc_per_node, '4']\n",
              "launch.extra_args[2] '--nproc_per_node' repeats --nproc_per_node, which paddlerun passes "
              "to paddle.distributed.launch itself; remove it (set launch.nproc_per_node instead)"),
    BadConfig("extra-args-repeat-log-dir", "launch:\n  extra_args: ['--log_dir=/tmp/elsewhere']\n",
              "launch.extra_args[0] '--log_dir=/tmp/elsewhere' repeats --log_dir"),
    BadConfig("extra-args-abbreviate-a-flag", "launch:\n  extra_args: [--nnode, '2']\n",
              "launch.extra_args[0] '--nnode' repeats --nnodes"),
    # paths and imports that do not resolve
    BadConfig("missing-dataset-path",
              "train:\n  dataset_args:\n    image_path: {tmp}/nowhere/train-images-idx3-ubyte.gz\n",
              "train.dataset_args.image_path: file not found: {tmp}/nowhere/train-images-idx3-ubyte.gz",
              names_file=False),
    BadConfig("missing-resume-from", "checkpoint:\n  resume_from: {tmp}/no-such-run\n",
              "checkpoint.resume_from: not found: {tmp}/no-such-run", names_file=False),
    BadConfig("unknown-package-model", "train:\n  model: no_such_pkg_7c1e.models:build\n",
              "train.model: cannot import 'no_such_pkg_7c1e'", names_file=False),
    BadConfig("unknown-package-optimizer", "train:\n  optimizer: no_such_opt_pkg:make\n",
              "train.optimizer: cannot import 'no_such_opt_pkg'", names_file=False),
    BadConfig("not-an-import-string", "train:\n  loss: my_loss\n",
              "train.loss: 'my_loss' is neither a built-in (cross_entropy) nor an import string",
              names_file=False),
    # files that are no config
    BadConfig("empty-file", "", "the file is empty"),
    BadConfig("only-comments", "# train:\n#   lr: 0.1\n", "the file is empty"),
    BadConfig("top-level-list", "- train\n- lr\n", "the top level must be a mapping"),
    BadConfig("yaml-unclosed-bracket", "job:\n  name: x\ntrain:\n  lr: [0.1\n  epochs: 2\n",
              "line 5, column 9: not valid YAML"),
    BadConfig("yaml-tab-indent", "train:\n\tlr: 0.1\n", "line 2, column 1: not valid YAML"),
    BadConfig("yaml-unclosed-quote", 'job:\n  name: "abc\ntrain:\n  lr: 0.1\n',
              "line 5, column 1: not valid YAML"),
    BadConfig("yaml-bad-indent", "train:\n  lr: 0.1\n   epochs: 2\n", "line 3, column 10: not valid YAML"),
]

# A config that is not UTF-8 (a binary file, a UTF-16 editor save): a message naming the
# byte and exit 2, not a UnicodeDecodeError traceback (load_config catches it).
NOT_UTF8 = pytest.param(
    BadConfig("not-utf8", "", "not valid UTF-8 text", raw=b"\xff\xfe\x00t\x00r\x00a\x00i\x00n\x00:\x00\n\x00"),
    id="not-utf8")


@pytest.mark.parametrize("case", [*BAD_CONFIGS, NOT_UTF8],
                         ids=[c.id for c in BAD_CONFIGS] + ["not-utf8"])
def test_bad_config_exits_2_naming_the_key_before_any_worker(tmp_path, case):
    config = tmp_path / "bad.yaml"
    if case.raw is not None:
        config.write_bytes(case.raw)
    else:
        config.write_text(case.text.replace("{tmp}", str(tmp_path)))
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result, message, imported = cli_run(config, run_dir, *case.sets)
    took = time.monotonic() - started

    assert result.returncode == 2, f"exit {result.returncode}:\n{message[-3000:]}"
    assert case.expected.replace("{tmp}", str(tmp_path)) in message, message
    assert message.startswith("paddlerun: bad config: "), message
    if case.names_file and not case.sets:
        assert str(config) in message, "the message names the file"
    assert "Traceback" not in message
    assert not run_dir.exists(), "nothing written: no run dir, no logs/, no attempt"
    assert not processes_of(run_dir), "no process started"
    paddle_modules = sorted(m for m in imported if m == "paddle" or m.startswith("paddle."))
    assert not paddle_modules, f"the supervisor imported {paddle_modules[:5]}"
    assert took < 30, f"took {took:.1f} s"  # ~0.5 s idle; generous for a loaded 2-core machine


def test_config_path_that_is_a_directory_exits_2(tmp_path):
    result, message, _ = cli_run(tmp_path, tmp_path / "run")
    assert result.returncode == 2, message
    assert f"config file not found: {tmp_path}" in message
    assert not (tmp_path / "run").exists()


# ====================================================================== snapshots: tools

class InotifyWatch:
    """Which of a few files were opened or read (inotify IN_OPEN | IN_ACCESS), by any process.

    A loader that follows a symlink or a manifest entry out of the snapshot opens the
    file outside; this sees it even when the data read from it is discarded afterwards.
    """
    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")
        self.paths: Dict[int, Path] = {}

    def watch(self, path: Path) -> None:
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN | self.IN_ACCESS)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = path

    def opened(self) -> list:
        seen = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return sorted(set(seen))
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                seen.append(str(self.paths.get(wd, wd)))
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def watcher():
    w = InotifyWatch()
    yield w
    w.close()


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail instead of hanging (a reader that opens a FIFO blocks forever)."""
    def expired(signum, frame):
        raise AssertionError(f"{what} did not return within {seconds} s: it blocked")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_header(path: Path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8:8 + n])


def write_header(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header; the same length when the new one fits (padded with spaces)."""
    data, n, header = read_header(path)
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    if len(new) <= n:
        new = new.ljust(n, b" ")
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def tensors_by_offset(header: dict) -> list:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def rewrite_manifest(snapshot: Path, change: Callable[[dict], None] = lambda m: None,
                     targets: Optional[Dict[str, Path]] = None) -> None:
    """Edit manifest.json and record the size and sha256 each entry now has, so that the
    manifest agrees with the lie. ``targets`` hashes an entry from another file (the one a
    symlink or an outside path points to), so only the reader's own rules can stop it."""
    path = snapshot / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    for entry in manifest["files"]:
        source = (targets or {}).get(entry["name"], snapshot / entry["name"])
        if source.is_file():
            entry["size"], (entry["sha256"],) = hash_file(source.resolve())
    path.write_text(json.dumps(manifest))


MARKER = 31337.0


def marker_file(path: Path, like: Path) -> Path:
    """A valid safetensors file with the same tensor names and shapes as ``like``, all MARKER."""
    arrays = {}
    _, _, header = read_header(like)
    for name in tensors_by_offset(header):
        arrays[name] = np.full(header[name]["shape"], MARKER, dtype=np.float32)
    write_tensors(path, arrays)
    return path


# ---- the corruptions: each takes the snapshot dir (and the watcher), returns the file to name

def header_offsets_past_the_end(snap, w):
    def change(h):
        last = tensors_by_offset(h)[-1]
        start, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [start, end + 4096]
    write_header(snap / "model.safetensors", change)
    rewrite_manifest(snap)
    return "model.safetensors"


def header_offsets_overlap(snap, w):
    def change(h):  # the second tensor's bytes start inside the first one's (sizes still agree)
        first, second = tensors_by_offset(h)[:2]
        start, end = h[second]["data_offsets"]
        h[second]["data_offsets"] = [0, end - start]
    write_header(snap / "model.safetensors", change)
    rewrite_manifest(snap)
    return "model.safetensors"


def header_wrong_shape(snap, w):
    def change(h):
        first = tensors_by_offset(h)[0]
        h[first]["shape"] = [d + 1 for d in h[first]["shape"]]
    write_header(snap / "model.safetensors", change)
    rewrite_manifest(snap)
    return "model.safetensors"


def header_wrong_dtype(snap, w):
    data = (snap / "model.safetensors").read_bytes()  # same length: F32 -> F64, twice the bytes
    (snap / "model.safetensors").write_bytes(data.replace(b'"F32"', b'"F64"'))
    rewrite_manifest(snap)
    return "model.safetensors"


def header_length_huge(snap, w):
    data = (snap / "model.safetensors").read_bytes()
    (snap / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    rewrite_manifest(snap)
    return "model.safetensors"


def header_length_past_the_end(snap, w):
    data = (snap / "model.safetensors").read_bytes()
    (snap / "model.safetensors").write_bytes(struct.pack("<Q", len(data) + 8) + data[8:])
    rewrite_manifest(snap)
    return "model.safetensors"


def header_not_json(snap, w):
    data, n, _ = read_header(snap / "model.safetensors")
    (snap / "model.safetensors").write_bytes(data[:8] + b"\xff{" * (n // 2) + b"}" * (n % 2) + data[8 + n:])
    rewrite_manifest(snap)
    return "model.safetensors"


def truncated_and_manifest_agrees(snap, w):
    os.truncate(snap / "model.safetensors", (snap / "model.safetensors").stat().st_size - 16)
    rewrite_manifest(snap)
    return "model.safetensors"


def zero_length_and_manifest_agrees(snap, w):
    (snap / "model.safetensors").write_bytes(b"")
    rewrite_manifest(snap)
    return "model.safetensors"


def state_not_json(snap, w):
    (snap / "trainer_state.json").write_bytes(b'{"step": 20, "rng": [1, 2,')
    rewrite_manifest(snap)
    return "trainer_state.json"


def manifest_names_parent(snap, w):
    outside = marker_file(snap.parent / "outside.safetensors", snap / "model.safetensors")

    def change(m):
        entry = next(e for e in m["files"] if e["name"] == "model.safetensors")
        entry["name"] = "../outside.safetensors"
    rewrite_manifest(snap, change, targets={"../outside.safetensors": outside})
    w.watch(outside)
    return "'../outside.safetensors'"


def manifest_names_etc_passwd(snap, w):
    def change(m):  # the size and sha256 of the real /etc/passwd: only the name rule stops it
        m["files"].append({"name": "/etc/passwd", "size": 0, "sha256": "0" * 64})
    rewrite_manifest(snap, change, targets={"/etc/passwd": Path("/etc/passwd")})
    return "'/etc/passwd'"


def manifest_names_nested_dir(snap, w):
    (snap / "sub").mkdir()
    (snap / "model.safetensors").rename(snap / "sub" / "model.safetensors")

    def change(m):
        next(e for e in m["files"] if e["name"] == "model.safetensors")["name"] = "sub/model.safetensors"
    rewrite_manifest(snap, change)
    return "'sub/model.safetensors'"


def entry_is_a_directory(snap, w):
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").mkdir()
    return "model.safetensors"


def symlink_out_of_the_snapshot(snap, w):
    outside = marker_file(snap.parent.parent / "outside-model.safetensors", snap / "model.safetensors")
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(outside)
    rewrite_manifest(snap, targets={"model.safetensors": outside})
    w.watch(outside)
    return "model.safetensors"


def manifest_is_a_symlink(snap, w):
    outside = snap.parent.parent / "outside-manifest.json"
    shutil.copyfile(snap / "manifest.json", outside)
    (snap / "manifest.json").unlink()
    (snap / "manifest.json").symlink_to(outside)
    w.watch(outside)
    return "manifest.json"


def fifo_instead_of_a_file(snap, w):
    (snap / "trainer_state.json").unlink()
    os.mkfifo(snap / "trainer_state.json")
    return "trainer_state.json"


STORE_CASES = [
    header_offsets_past_the_end, header_offsets_overlap, header_wrong_shape, header_length_huge,
    header_length_past_the_end, header_not_json, truncated_and_manifest_agrees,
    zero_length_and_manifest_agrees, manifest_names_parent, manifest_names_etc_passwd,
    manifest_names_nested_dir, entry_is_a_directory, symlink_out_of_the_snapshot,
    manifest_is_a_symlink, fifo_instead_of_a_file,
]


# ====================================================================== snapshots: the store

def store_snapshot(store: CheckpointStore, step: int) -> Path:
    rng = np.random.default_rng(step)
    staging = store.stage(step)
    staging.write_tensors("model.safetensors", {"fc.weight": rng.standard_normal((16, 8)).astype(np.float32),
                                                "fc.bias": rng.standard_normal(8).astype(np.float32)})
    staging.write_tensors("optimizer.safetensors", {"fc.weight_moment1": np.full((16, 8), step, np.float32)})
    staging.write_json("trainer_state.json", {"step": step, "epoch": 0, "batch": step})
    return store.commit(staging, {"epoch": 0, "world_size": 1})


def read_all(info: SnapshotInfo) -> None:
    for name in info.files:
        info.read_tensors(name) if name.endswith(".safetensors") else info.read_json(name)


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == LOGGER and r.levelno >= logging.WARNING)


@pytest.mark.parametrize("corrupt", STORE_CASES, ids=[c.__name__ for c in STORE_CASES])
def test_store_refuses_a_lying_snapshot_and_falls_back(tmp_path, caplog, watcher, corrupt):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=5)
    store.open_writer({"run_dir": str(tmp_path)})
    good = _read_model(store, store_snapshot(store, 10))
    bad_file = corrupt(store_snapshot(store, 20), watcher)
    caplog.set_level(logging.WARNING, LOGGER)

    with deadline(20, "reading the snapshots"):
        newest = store.newest_complete()
        assert newest is not None and newest.step == 10
        warned = warnings_of(caplog)
        assert "step-00000020" in warned and bad_file in warned, warned
        broken = store.snapshots(verify=True)[-1]
        assert broken.step == 20 and not broken.complete and bad_file in broken.problem, broken
        with pytest.raises(CheckpointError):  # reading it file by file, as a restore does
            with store.reading(broken.path) as info:
                read_all(info)
        with store.reading(newest) as info:
            model = info.read_tensors("model.safetensors")
    assert all(np.array_equal(model[n], good[n]) for n in good), "the older snapshot, unchanged"
    assert not any(np.any(a == MARKER) for a in model.values())
    assert watcher.opened() == [], "a file outside the snapshot was opened"


def _read_model(store: CheckpointStore, path: Path) -> dict:
    with store.reading(path) as info:
        return info.read_tensors("model.safetensors")


def test_reading_a_fifo_from_a_listed_snapshot_never_blocks(tmp_path):
    """A reader that lists, then reads (the snapshot may change in between)."""
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=5)
    store.open_writer({"run_dir": str(tmp_path)})
    store_snapshot(store, 10)
    listed = store.snapshots()[-1]
    fifo_instead_of_a_file(listed.path, None)
    with deadline(3, "SnapshotInfo.read_json on a FIFO"):
        with pytest.raises(CheckpointError, match="trainer_state.json"):
            listed.read_json("trainer_state.json")


def test_ckpt_commands_never_open_a_file_outside_the_snapshot(tmp_path, watcher):
    """``paddlerun ckpt list --verify / verify / digest`` on a run whose two newest snapshots
    point outside themselves (a symlink, a ``../`` manifest entry, both with a matching
    sha256): each command refuses them naming the file, uses the older one, opens nothing outside."""
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir / "checkpoints", lock_timeout_s=5)
    store.open_writer({"run_dir": str(tmp_path)})
    store_snapshot(store, 10)
    symlink_out_of_the_snapshot(store_snapshot(store, 20), watcher)
    manifest_names_parent(store_snapshot(store, 30), watcher)

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "ckpt", *argv],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    listed = cli("list", str(run_dir), "--verify", "--json")
    assert listed.returncode == 0, listed.stderr
    states = {s["step"]: (s["state"], s["problem"]) for s in json.loads(listed.stdout)}
    assert states[10] == ("complete", None)
    assert states[20][0] == "corrupt" and "model.safetensors is a symlink" in states[20][1]
    assert states[30][0] == "corrupt" and "'../outside.safetensors'" in states[30][1]
    verified = cli("verify", str(run_dir))
    assert verified.returncode == 1
    assert "step-00000030" in verified.stdout + verified.stderr
    assert "step-00000010" in verified.stdout + verified.stderr, "names the fallback"
    for step in (20, 30):
        one = cli("verify", str(store.directory / f"step-{step:08d}"))
        assert one.returncode == 1, one.stdout + one.stderr
    digest = cli("digest", str(run_dir))
    assert digest.returncode == 0, digest.stderr
    assert watcher.opened() == [], "a file outside the snapshot was opened"


# ====================================================================== snapshots: real restore

@pytest.fixture
def restore_kit(tmp_path):
    """Real paddle (imported here, not at collection). Yields ``make() -> (Checkpointer, trainer)``."""
    pytest.importorskip("paddle")
    from checkpointer_kit import make_checkpointer, train_step

    opened = []

    def make():
        ckpt, trainer = make_checkpointer(tmp_path, directory="checkpoints")
        opened.append(ckpt)
        return ckpt, trainer

    make.train = train_step
    yield make
    for ckpt in opened:
        with contextlib.suppress(Exception):
            ckpt.close()


def model_state(trainer) -> dict:
    from paddlerun.trainer import state as tstate
    return tstate.model_arrays(trainer.layer)


def consistent_lie_transposed(snap, w):
    def change(h):  # Linear.weight [8, 4] -> [4, 8]: the same bytes, so the file is self-consistent
        weight = next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)
        h[weight]["shape"] = h[weight]["shape"][::-1]
    write_header(snap / "model.safetensors", change)
    rewrite_manifest(snap)
    return "model.safetensors"


def consistent_lie_dtype(snap, w):
    data = (snap / "model.safetensors").read_bytes()  # F32 -> I32: the same size, other numbers
    (snap / "model.safetensors").write_bytes(data.replace(b'"F32"', b'"I32"'))
    rewrite_manifest(snap)
    return "model.safetensors"


def state_not_an_object(snap, w):
    (snap / "trainer_state.json").write_text("[]")
    rewrite_manifest(snap)
    return "trainer_state.json"


def plain_truncation(snap, w):
    os.truncate(snap / "model.safetensors", (snap / "model.safetensors").stat().st_size - 16)
    return "model.safetensors"


RESTORE_CASES = [
    header_wrong_dtype, header_wrong_shape, header_offsets_past_the_end, header_offsets_overlap,
    truncated_and_manifest_agrees, zero_length_and_manifest_agrees, state_not_json,
    symlink_out_of_the_snapshot, manifest_names_parent, manifest_names_etc_passwd,
    manifest_names_nested_dir, plain_truncation,
]
# Snapshots the store cannot tell from good ones (every file matches the manifest, every
# header fits its data) but whose content does not fit the model that wrote them (same
# config hash): restore treats them as corrupt and falls back to the older snapshot.
RESTORE_LIES = [consistent_lie_transposed, consistent_lie_dtype, state_not_an_object]


@pytest.mark.parametrize("corrupt", [*RESTORE_CASES, *RESTORE_LIES],
                         ids=[c.__name__ for c in [*RESTORE_CASES, *RESTORE_LIES]])
def test_restore_skips_a_lying_snapshot_for_the_older_one(tmp_path, caplog, watcher, restore_kit,
                                                          corrupt):
    ckpt, trainer = restore_kit()
    restore_kit.train(trainer, 10)
    ckpt.save(trainer, wait=True)
    at_10 = model_state(trainer)
    restore_kit.train(trainer, 10)
    ckpt.save(trainer, wait=True)
    ckpt.close()
    bad_file = corrupt(tmp_path / "checkpoints" / "step-00000020", watcher)
    caplog.set_level(logging.INFO, LOGGER)

    fresh_ckpt, fresh = restore_kit()
    with deadline(60, "restore"):
        position = fresh_ckpt.restore(fresh)
    assert position is not None and position.step == 10, position
    restored = model_state(fresh)
    assert all(np.array_equal(restored[n], at_10[n]) for n in at_10), "exactly the step-10 model"
    assert not any(np.any(a == MARKER) for a in restored.values())
    assert watcher.opened() == [], "a file outside the snapshot was opened"
    warned = warnings_of(caplog)
    assert "step-00000020" in warned and bad_file in warned, \
        f"no warning names the bad file; the log says:\n{caplog.text[-3000:]}"


# ====================================================================== end to end

@pytest.fixture(scope="module")
def run_to_20(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lying-header")
    result = run(run_dir, "train.max_steps=20", "checkpoint.every_steps=10", timeout=400)
    assert result.returncode == 0, result.stdout[-5000:]
    assert_no_leftovers(run_dir)
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step-*"))] == \
        ["step-00000010", "step-00000020"]
    return run_dir


def lie_in_model_header(snapshot: Path, rewrite: bool) -> None:
    """F32 -> F64 in every header entry: the same file size, a header that claims twice the
    bytes it has. ``rewrite``: also rewrite manifest.json to match, so its sha256 passes."""
    model = snapshot / "model.safetensors"
    size = model.stat().st_size
    data = model.read_bytes()
    assert data.count(b'"F32"') >= 2
    model.write_bytes(data.replace(b'"F32"', b'"F64"'))
    assert model.stat().st_size == size
    if rewrite:
        rewrite_manifest(snapshot)


@pytest.mark.slow
@pytest.mark.parametrize("rewrite", [True, False], ids=["manifest-rewritten", "manifest-kept"])
def test_a_lying_header_makes_the_rerun_resume_from_the_older_snapshot(run_to_20, tmp_path, rewrite):
    """The rerun skips step 20 for step 10, trains to 20 again and saves it: the commit must
    replace the corrupt step-20 (it used to refuse it as complete, failing every attempt)."""
    run_dir = tmp_path / "run"
    shutil.copytree(run_to_20, run_dir, symlinks=True)
    lie_in_model_header(run_dir / "checkpoints" / "step-00000020", rewrite)

    result = run(run_dir, "train.max_steps=30", "checkpoint.every_steps=10",
                 "supervisor.max_restarts=1", timeout=400)
    out = result.stdout
    assert_no_leftovers(run_dir)
    bad = str(run_dir / "checkpoints" / "step-00000020" / "model.safetensors")
    assert f"skipping snapshot {run_dir / 'checkpoints' / 'step-00000020'}" in out, out[-5000:]
    assert bad in out, "the warning names the file"
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000010'}: step 10" in out
    assert result.returncode == 0, out[-5000:]
    s = summary(run_dir)
    assert s["status"] == "succeeded" and s["global_steps"] == 30 and s["restarts"] == 0
    assert f"replacing corrupt snapshot {run_dir / 'checkpoints' / 'step-00000020'}" in out
    listed = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "ckpt", "list",
                             str(run_dir), "--verify", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert [(x["step"], x["state"]) for x in json.loads(listed.stdout)] == \
        [(10, "complete"), (20, "complete"), (30, "complete")]
