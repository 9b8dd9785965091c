"""``paddlerun ckpt list|verify|digest|export`` on the snapshots of a real short run.

One real run (2 CPU workers, 20 steps, snapshots at 10 and 20, a cosine LR schedule so
the optimizer state carries ``LR_Scheduler``) is shared by the module. Tests that damage
snapshots work on a copy of its checkpoints directory. The export is checked by real
paddle in a subprocess: ``paddle.Model.load`` and ``paddle.load`` read what we wrote, and
one training step from the loaded state equals one step from the snapshot itself.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import REPO, assert_no_leftovers, run, summary
from paddlerun.launcher.cli import main
from paddlerun.trainer.checkpoint import CheckpointStore
from paddlerun.trainer.rundir.digest import params_digest

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt-run")
    result = run(run_dir, "train.max_steps=20", "checkpoint.every_steps=10",
                 "train.lr_schedule=cosine", timeout=240)
    assert result.returncode == 0, result.stdout[-5000:]
    assert_no_leftovers(run_dir)
    return run_dir


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command line in its own process."""
    return subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def copy_checkpoints(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", target)
    return target


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ paddle-free


@slow
def test_every_command_runs_without_importing_paddle(real_run, tmp_path):
    code = f"""
import contextlib, io, sys
import paddlerun.launcher.cli as cli
assert not [m for m in sys.modules if m == "paddle" or m.startswith("paddle.")], "import"
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [cli.main(["ckpt", "list", {str(real_run)!r}, "--verify"]),
             cli.main(["ckpt", "verify", {str(real_run)!r}]),
             cli.main(["ckpt", "digest", {str(real_run)!r}]),
             cli.main(["ckpt", "export", {str(real_run)!r}, {str(tmp_path / 'out')!r}]),
             cli.main(["status", {str(real_run)!r}])]
loaded = sorted(m for m in sys.modules if m == "paddle" or m.startswith("paddle."))
print(codes, loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0, 0] []"


# ------------------------------------------------------------------ list


@slow
def test_list_shows_every_snapshot(real_run, capsys):
    assert main(["ckpt", "list", str(real_run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["SNAPSHOT", "STEP", "EPOCH", "WORKERS", "CREATED", "SIZE", "FILES",
                                "REASON", "STATE", "PROBLEM"]
    assert lines[1].split()[:4] == ["step-00000010", "10", "0", "2"] and "scheduled" in lines[1]
    assert lines[2].split()[:4] == ["step-00000020", "20", "0", "2"] and "final" in lines[2]
    assert "complete" in lines[1] and "complete" in lines[2]
    assert "newest complete: step-00000020" in out

    assert main(["ckpt", "list", str(real_run / "checkpoints"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in listed] == [10, 20]
    for s in listed:
        snap = Path(s["path"])
        assert s["state"] == "complete" and s["problem"] is None and s["files"] == 3
        assert s["size_bytes"] == sum(p.stat().st_size for p in snap.iterdir())
        assert s["epoch"] == 0 and s["world_size"] == 2
        assert abs(s["created_unix"] - json.loads((snap / "manifest.json").read_text())["created_unix"]) < 1e-6


@slow
def test_list_names_the_bad_file_of_each_broken_snapshot(real_run, tmp_path, capsys):
    ckpts = copy_checkpoints(real_run, tmp_path)
    flip_byte(ckpts / "step-00000020" / "model.safetensors")            # same size, wrong bytes
    with open(ckpts / "step-00000010" / "optimizer.safetensors", "r+b") as f:
        f.truncate(1000)                                                  # truncated
    shutil.copytree(ckpts / "step-00000010", ckpts / "step-00000030")
    (ckpts / "step-00000030" / "manifest.json").unlink()                 # commit never finished

    assert main(["ckpt", "list", str(ckpts), "--json"]) == 0
    quick = {s["step"]: s for s in json.loads(capsys.readouterr().out)}
    assert quick[10]["state"] == "corrupt"
    assert quick[10]["problem"].startswith("optimizer.safetensors is 1000 bytes")
    assert quick[20]["state"] == "complete", "without --verify a same-size change is not seen"
    assert quick[30]["state"] == "incomplete" and quick[30]["problem"].startswith("manifest.json is missing")
    assert quick[30]["files"] is None and quick[30]["epoch"] is None

    assert main(["ckpt", "list", str(ckpts), "--json", "--verify"]) == 0
    full = {s["step"]: s for s in json.loads(capsys.readouterr().out)}
    assert full[20]["state"] == "corrupt"
    assert full[20]["problem"].startswith("model.safetensors: sha256")

    assert main(["ckpt", "list", str(ckpts), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "no complete snapshot: a restart starts from step 0" in out


def test_list_tolerates_retention_deleting_snapshots(tmp_path, capsys):
    """A writer commits snapshot after snapshot with keep_last=1 while we list and verify."""
    store = CheckpointStore(tmp_path / "checkpoints")
    store.open_writer({"run_dir": str(tmp_path)})
    stop = threading.Event()
    errors = []

    def writer():
        step = 0
        try:
            while not stop.is_set():
                step += 1
                staging = store.stage(step)
                staging.write_tensors("model.safetensors",
                                      {"w": np.full((64, 64), step, dtype=np.float32)})
                staging.write_json("trainer_state.json", {"step": step})
                store.commit(staging, {"epoch": 0})
                store.apply_retention(keep_last=1)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not store.snapshots() and thread.is_alive():
            time.sleep(0.01)
        deadline = time.time() + 2.0
        calls = 0
        while time.time() < deadline and thread.is_alive():
            assert main(["ckpt", "list", str(store.directory), "--json"]) == 0
            listed = json.loads(capsys.readouterr().out)
            assert listed and all(s["state"] == "complete" for s in listed), listed
            assert main(["ckpt", "verify", str(tmp_path)]) == 0  # a run dir: its checkpoints/
            assert capsys.readouterr().out.startswith("OK ")
            calls += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    assert calls > 5


# ------------------------------------------------------------------ verify


@slow
def test_verify_intact_prints_one_ok_line(real_run):
    result = cli("ckpt", "verify", str(real_run))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"OK {real_run / 'checkpoints' / 'step-00000020'} (step 20): 3 files, ")
    older = cli("ckpt", "verify", str(real_run / "checkpoints" / "step-00000010"))
    assert older.returncode == 0 and "(step 10)" in older.stdout


@slow
def test_verify_checks_the_newest_snapshot_and_names_the_fallback(real_run, tmp_path):
    ckpts = copy_checkpoints(real_run, tmp_path)
    flip_byte(ckpts / "step-00000020" / "optimizer.safetensors")
    result = cli("ckpt", "verify", str(ckpts))
    assert result.returncode == 1
    first, second = result.stdout.splitlines()
    assert first.startswith(f"CORRUPT {ckpts / 'step-00000020'} (step 20): optimizer.safetensors: "
                            f"sha256 ")
    assert "does not match the manifest's" in first
    assert f"resumes from the newest complete snapshot, {ckpts / 'step-00000010'} (step 10" in second

    flip_byte(ckpts / "step-00000010" / "trainer_state.json", offset=10)
    result = cli("ckpt", "verify", str(ckpts))
    assert result.returncode == 1
    assert "no older complete snapshot exists" in result.stdout
    direct = cli("ckpt", "verify", str(ckpts / "step-00000010"))
    assert direct.returncode == 1 and "trainer_state.json: sha256" in direct.stdout


def test_verify_with_no_snapshot_fails_naming_the_directory(tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    result = cli("ckpt", "verify", str(tmp_path))
    assert result.returncode == 1
    assert f"no snapshot in {tmp_path / 'checkpoints'}" in result.stderr


@pytest.mark.parametrize("make", ["missing", "file", "empty", "other"])
def test_a_path_that_is_no_snapshot_is_bad_usage(tmp_path, make, capsys):
    path = tmp_path / "x"
    if make == "file":
        path.write_text("hello")
    elif make == "empty":
        path.mkdir()
    elif make == "other":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    for command in (["list"], ["verify"], ["digest"], ["export", str(tmp_path / "out")]):
        assert main(["ckpt", command[0], str(path), *command[1:]]) == 2, command
        err = capsys.readouterr().err
        assert str(path) in err and "expected a snapshot directory" in err
    assert not (tmp_path / "out.pdparams").exists()
    # The same through the real entry point (python -m runs the CLI module as __main__).
    result = cli("ckpt", "verify", str(path))
    assert result.returncode == 2 and "expected a snapshot directory" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ digest


@slow
def test_digest_equals_the_digest_the_worker_wrote(real_run):
    expected = summary(real_run)["digest"]
    for path in (real_run, real_run / "checkpoints", real_run / "checkpoints" / "step-00000020"):
        result = cli("ckpt", "digest", str(path))
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"
    model = load_file(str(real_run / "checkpoints" / "step-00000020" / "model.safetensors"))
    assert params_digest(model) == expected


@slow
def test_digest_refuses_a_corrupt_snapshot_and_falls_back_for_a_directory(real_run, tmp_path):
    ckpts = copy_checkpoints(real_run, tmp_path)
    flip_byte(ckpts / "step-00000020" / "model.safetensors")
    bad = cli("ckpt", "digest", str(ckpts / "step-00000020"))
    assert bad.returncode == 1 and bad.stdout == ""
    assert "model.safetensors" in bad.stderr and "corrupt" in bad.stderr
    fallback = cli("ckpt", "digest", str(ckpts))
    assert fallback.returncode == 0
    step10 = load_file(str(ckpts / "step-00000010" / "model.safetensors"))
    assert fallback.stdout.strip() == params_digest(step10)
    assert "skipping snapshot" in fallback.stderr and "step-00000020" in fallback.stderr


# ------------------------------------------------------------------ export

PADDLE_CHECK = r"""
import hashlib, json, sys
import numpy as np
import paddle
from paddle.utils import unique_name
from safetensors.numpy import load_file
from paddlerun.trainer.rundir.digest import params_digest
from paddlerun.trainer.models import LeNet
from paddlerun.trainer import state as tstate

prefix, snapshot = sys.argv[1], sys.argv[2]
paddle.seed(7)
x = paddle.randn([8, 1, 28, 28])
y = paddle.randint(0, 10, [8, 1])

def build():
    net = LeNet()
    sched = paddle.optimizer.lr.CosineAnnealingDecay(0.001, T_max=20)
    opt = paddle.optimizer.Adam(learning_rate=sched, parameters=net.parameters())
    return net, sched, opt

def digest(net):
    return params_digest({k: v.numpy() for k, v in net.state_dict().items()})

def step(net, sched, opt):
    loss = paddle.nn.functional.cross_entropy(net(x), y)
    loss.backward(); opt.step(); opt.clear_grad(); sched.step()
    return digest(net)

out = {}
# Each model in its own name scope, so every one gets the parameter names the snapshot's
# optimizer keys use (conv2d_0.w_0, ...), as in the fresh process that wrote it.
with unique_name.guard():
    net, sched, opt = build()
    model = paddle.Model(net)
    model.prepare(optimizer=opt, loss=paddle.nn.CrossEntropyLoss())
    model.load(prefix)
    out["model_load"] = digest(net)
    out["lr_after_load"] = sched.state_dict()
    out["after_step_exported"] = step(net, sched, opt)
with unique_name.guard():
    net, sched, opt = build()
    state = json.loads(open(snapshot + "/trainer_state.json").read())
    arrays = load_file(snapshot + "/model.safetensors")
    tstate.check_model(net, arrays, source=snapshot)
    tstate.load_model(net, arrays)
    tstate.restore_optimizer(opt, load_file(snapshot + "/optimizer.safetensors"), state["optimizer_extra"])
    out["after_step_snapshot"] = step(net, sched, opt)
with unique_name.guard():
    net, sched, opt = build()
    paddle.Model(net).load(prefix, reset_optimizer=True)
    out["after_step_without_optimizer_state"] = step(net, sched, opt)

params = paddle.load(prefix + ".pdparams")
out["paddle_load"] = params_digest({k: v.numpy() for k, v in params.items()})
pdopt = paddle.load(prefix + ".pdopt")
out["pdopt"] = {k: ([str(v.numpy().dtype), list(v.shape), hashlib.sha256(v.numpy().tobytes()).hexdigest()]
                    if isinstance(v, paddle.Tensor) else v) for k, v in pdopt.items()}
print(json.dumps(out))
"""


@slow
def test_export_is_read_by_paddle_model_load_and_paddle_load(real_run, tmp_path):
    snapshot = real_run / "checkpoints" / "step-00000020"
    prefix = tmp_path / "exported" / "lenet"
    result = cli("ckpt", "export", str(real_run), str(prefix))
    assert result.returncode == 0, result.stderr
    assert f"{prefix}.pdparams" in result.stdout and "LR_Scheduler" in result.stdout
    assert not list(prefix.parent.glob(".*")), "no temporary files left"

    check = subprocess.run([sys.executable, "-c", PADDLE_CHECK, str(prefix), str(snapshot)],
                           cwd=REPO, capture_output=True, text=True, timeout=180)
    assert check.returncode == 0, check.stderr[-3000:]
    out = json.loads(check.stdout.strip().splitlines()[-1])

    digest = summary(real_run)["digest"]
    assert out["model_load"] == digest, "Model.load gives the snapshot's parameters"
    assert out["paddle_load"] == digest, "paddle.load gives the snapshot's parameters"

    trainer_state = json.loads((snapshot / "trainer_state.json").read_text())
    lr_state = trainer_state["optimizer_extra"]["LR_Scheduler"]
    assert lr_state["last_epoch"] == 20
    assert out["lr_after_load"] == lr_state, "Model.load restored the LR scheduler"

    moments = load_file(str(snapshot / "optimizer.safetensors"))
    expected = {k: [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]
                for k, a in moments.items()}
    assert any(k.endswith("_moment1_0") for k in expected)
    assert out["pdopt"] == {**expected, "LR_Scheduler": lr_state}, \
        "paddle.load(.pdopt) returns every optimizer tensor with identical bytes, and LR_Scheduler"

    assert out["after_step_exported"] == out["after_step_snapshot"], \
        "training on from the exported files equals training on from the snapshot"
    assert out["after_step_without_optimizer_state"] != out["after_step_exported"], \
        "the optimizer state matters to that step (the comparison above can fail)"


@slow
def test_export_accepts_a_pdparams_name_and_overwrites_atomically(real_run, tmp_path):
    (tmp_path / "m.pdparams").write_bytes(b"old")
    result = cli("ckpt", "export", str(real_run / "checkpoints" / "step-00000010"),
                 str(tmp_path / "m.pdparams"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pdopt", "m.pdparams"]
    assert (tmp_path / "m.pdparams").read_bytes()[:1] == b"\x80", "a pickle, protocol >= 2"
