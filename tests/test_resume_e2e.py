"""Exact resume: stopping and running the same command again changes nothing, bit for bit."""
import json

import pytest

from helpers import assert_no_leftovers, run, summary

pytestmark = pytest.mark.slow

TOTAL = 70  # more than one epoch: 63 steps per epoch at global batch 64


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(run_dir, f"train.max_steps={TOTAL}")
    assert result.returncode == 0, result.stdout[-5000:]
    return run_dir


def losses(run_dir):
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                               .splitlines()) if "loss" in m}


# 17: mid-epoch, off the snapshot schedule; 63: exactly the end of the first epoch;
# 20: right on a scheduled snapshot (every 10 steps).
@pytest.mark.parametrize("stop_at", [17, 63, 20])
def test_stop_and_rerun_gives_identical_parameters(tmp_path, reference, stop_at):
    first = run(tmp_path, f"train.max_steps={stop_at}")
    assert first.returncode == 0, first.stdout[-5000:]
    assert summary(tmp_path)["global_steps"] == stop_at
    second = run(tmp_path, f"train.max_steps={TOTAL}")
    assert second.returncode == 0, second.stdout[-5000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{stop_at:08d}'}" in second.stdout
    s = summary(tmp_path)
    assert s["global_steps"] == TOTAL
    assert s["digest"] == summary(reference)["digest"]
    assert_no_leftovers(tmp_path)


def test_loss_goes_on_as_if_never_stopped(tmp_path, reference):
    ref_dir = reference
    assert run(tmp_path, "train.max_steps=33").returncode == 0
    assert run(tmp_path, f"train.max_steps={TOTAL}").returncode == 0
    resumed, uninterrupted = losses(tmp_path), losses(ref_dir)
    after = [step for step in uninterrupted if step > 35]
    assert after and all(resumed[step] == uninterrupted[step] for step in after)


def test_changed_model_shape_is_refused_naming_the_parameter(tmp_path):
    assert run(tmp_path, "train.max_steps=10").returncode == 0
    result = run(tmp_path, "train.max_steps=20", "train.model_args.num_classes=12",
                 "supervisor.max_restarts=3")
    assert result.returncode == 1
    assert "parameter 'linear3.weight' has shape [84, 10] in the snapshot but [84, 12]" in result.stdout
    assert "giving up: not retriable" in result.stdout, "a mismatch is never retried"
