"""Sharded optimizer state (fleet sharding stage 1) with the real launcher and 2 CPU workers.

Every rank writes its own optimizer shard into the same snapshot, rank 0 commits only
with all of them, and a resume restores each rank's shard: the final parameters are the
same, bit for bit, as those of a run that never stopped.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import (REPO, assert_no_leftovers, events, heartbeat, killed_on_error, run, start, summary, wait_for,
                     worker_digests)

pytestmark = pytest.mark.slow

TOTAL = 40
# A step LR schedule, so the scheduler's state is part of what must resume exactly.
SHARDED = ("train.sharded_optimizer=true", "train.lr_schedule=step",
           "train.lr_schedule_args.step_size=15", "train.lr_schedule_args.gamma=0.5")
SHARDS = ["optimizer-rank-00000.safetensors", "optimizer-rank-00001.safetensors"]


def sharded_run(run_dir, max_steps, *sets, **kwargs):
    result = run(run_dir, f"train.max_steps={max_steps}", *SHARDED, *sets, **kwargs)
    assert_no_leftovers(run_dir)
    return result


def snapshot(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:08d}"


def ckpt_list(run_dir, *flags):
    listed = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "ckpt", "list",
                             str(run_dir), "--json", *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    return {s["step"]: s for s in json.loads(listed.stdout)}


def resumed_step(out):
    lines = [line for line in out.splitlines() if "resumed from" in line]
    assert lines, out[-5000:]
    return int(lines[-1].split("step-")[1][:8])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = sharded_run(run_dir, TOTAL)
    assert result.returncode == 0, result.stdout[-5000:]
    return run_dir


def test_every_rank_writes_its_shard_and_the_replicas_agree(reference):
    final = snapshot(reference, TOTAL)
    names = sorted(p.name for p in final.iterdir())
    assert names == ["manifest.json", "model.safetensors", *SHARDS, "trainer_state.json"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} >= set(SHARDS)
    assert manifest["sharded_optimizer"] is True and manifest["world_size"] == 2
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["optimizer_extra"]["LR_Scheduler"]["last_epoch"] == TOTAL
    digests = worker_digests(reference)
    assert sorted(digests) == [0, 1] and len(set(digests.values())) == 1, digests
    assert digests[0] == summary(reference)["digest"]


def test_stop_and_rerun_gives_identical_parameters(tmp_path, reference):
    first = sharded_run(tmp_path, 17)
    assert first.returncode == 0, first.stdout[-5000:]
    second = sharded_run(tmp_path, TOTAL)
    assert second.returncode == 0, second.stdout[-5000:]
    assert resumed_step(second.stdout) == 17
    assert summary(tmp_path)["digest"] == summary(reference)["digest"]
    # The rerun's last attempt ends the run: a restart at start-up is no failure of this check
    # (Paddle 3.2.1 once lost fleet.init's gloo rendezvous, "Connection refused"; the supervisor
    # restarted it and the result was still exact).
    rerun = summary(tmp_path)
    digests = worker_digests(tmp_path, attempt=rerun["first_attempt"] + rerun["attempts"] - 1)
    assert set(digests.values()) == {summary(reference)["digest"]} and len(digests) == 2


def test_a_snapshot_missing_a_shard_is_not_complete_and_the_older_one_is_used(tmp_path, reference):
    assert sharded_run(tmp_path, 20).returncode == 0
    (snapshot(tmp_path, 20) / SHARDS[1]).unlink()
    listed = ckpt_list(tmp_path)
    assert listed[20]["state"] != "complete" and SHARDS[1] in listed[20]["problem"], listed[20]
    assert listed[10]["state"] == "complete"
    again = sharded_run(tmp_path, TOTAL)
    assert again.returncode == 0, again.stdout[-5000:]
    assert resumed_step(again.stdout) == 10
    assert summary(tmp_path)["digest"] == summary(reference)["digest"]


def test_a_corrupt_shard_makes_every_rank_fall_back_together(tmp_path, reference):
    """Only rank 1 reads rank 1's shard: all ranks must still pick the same snapshot."""
    assert sharded_run(tmp_path, 17).returncode == 0
    shard = snapshot(tmp_path, 17) / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only its sha256 tells
    shard.write_bytes(bytes(data))
    assert ckpt_list(tmp_path, "--verify")[17]["state"] == "corrupt"
    again = sharded_run(tmp_path, TOTAL)
    assert again.returncode == 0, again.stdout[-5000:]
    for rank in (0, 1):
        log = (tmp_path / "logs" / "attempt-1" / f"workerlog.{rank}").read_text()
        assert f"rank {rank} attempt 1 INFO paddlerun.checkpoint: resumed from " \
               f"{snapshot(tmp_path, 10)}:" in log
    assert summary(tmp_path)["digest"] == summary(reference)["digest"]


def test_ranks_that_restore_different_snapshots_stop(tmp_path, reference):
    source = tmp_path / "copied-step-30"
    shutil.copytree(snapshot(reference, 30), source)
    shard = source / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = sharded_run(tmp_path / "run", TOTAL, f"checkpoint.resume_from={source}",
                         "supervisor.max_restarts=0", timeout=120)
    assert result.returncode == 1
    # Rank 0 chose it (it reads only its own shard); rank 1 must load exactly that one.
    assert "RestoreDisagreement: rank 0 resumed from step 30 of resume_from" in result.stdout, \
        result.stdout[-5000:]
    assert f"rank 1: CheckpointError: {source / SHARDS[1]} is corrupt: sha256" in result.stdout


def test_a_snapshot_of_two_shards_resumes_on_one_worker_with_every_shard(tmp_path, reference):
    """2 ranks wrote a shard each; 1 worker merges them by name and goes on. Adam's
    beta1 power of every parameter proves each one's state was restored, not restarted:
    it starts at 0.9 and is multiplied by 0.9 at every step, so after 40 + 10 steps it is
    0.9 ** 51, where a fresh state would give 0.9 ** 11."""
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints",
                    ignore=shutil.ignore_patterns(".*"))
    result = sharded_run(tmp_path, TOTAL + 10, "launch.nproc_per_node=1", timeout=120)
    assert result.returncode == 0, result.stdout[-5000:]
    resumed = next(e for e in events(tmp_path) if e["event"] == "resumed")
    assert (resumed["from_world_size"], resumed["to_world_size"], resumed["step"]) == (2, 1, TOTAL)
    from safetensors.numpy import load_file
    final = load_file(str(snapshot(tmp_path, TOTAL + 10) / "optimizer.safetensors"))
    pows = {k: float(v.reshape(-1)[0]) for k, v in final.items() if "beta1_pow_acc" in k}
    shard_keys = set()
    for name in SHARDS:
        shard_keys |= set(load_file(str(snapshot(reference, TOTAL) / name)))
    assert pows and {k for k in final if "beta1_pow_acc" in k} == {k for k in shard_keys if "beta1_pow_acc" in k}
    assert all(abs(p - 0.9 ** (TOTAL + 11)) < 1e-7 for p in pows.values()), pows


def test_sigkill_of_rank_1_recovers_from_the_scheduled_snapshot(tmp_path, reference):
    proc = start(tmp_path, f"train.max_steps={TOTAL}", *SHARDED)
    with killed_on_error(proc):
        pid = wait_for(lambda: (heartbeat(tmp_path, 1) or {}).get("step", 0) >= 12
                       and heartbeat(tmp_path, 1)["pid"], 120, "rank 1 to pass step 12")
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
    assert_no_leftovers(tmp_path)
    assert proc.returncode == 0, out[-5000:]
    failed = next(e for e in events(tmp_path) if e["event"] == "worker_failed")
    assert failed["rank"] == 1 and failed["cause"] == "rank 1 killed by SIGKILL", failed
    committed = [e for e in events(tmp_path) if e["event"] == "snapshot_committed"]
    assert not any(e["reason"] == "emergency" for e in committed), "no emergency snapshot when sharded"
    assert resumed_step(out) % 10 == 0
    assert summary(tmp_path)["digest"] == summary(reference)["digest"]
