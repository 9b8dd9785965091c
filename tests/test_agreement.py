"""The stop/snapshot agreement every training loop uses (trainer/agreement.py), with real ranks.

Two workers under the real ``paddle.distributed.launch`` (gloo) run tests/agreement_job.py:
a stop asked on one rank only (its node's control file, or a SIGTERM) stops both at the
same agreement point; rank 0's clock decides a time-based snapshot, agreed by all where
all write and alone where it writes alone; another rank's clock never counts; and without
anything that could ask, no collective is entered.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("paddle")

from paddlerun.launcher.process_tree import ProcessTree
from paddlerun.trainer.agreement import Position, StepAgreement

JOB = Path(__file__).resolve().parent / "agreement_job.py"


def test_two_ranks_stop_together_on_one_ranks_request_and_snapshot_on_rank_0s_clock(tmp_path):
    tree = ProcessTree([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                        "--log_dir", str(tmp_path / "logs"), str(JOB), str(tmp_path)],
                       env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree.start()
    try:
        code = tree.wait(120)
    finally:
        tree.close()
    logs = {rank: (tmp_path / "logs" / f"workerlog.{rank}").read_text() for rank in (0, 1)}
    results = {}
    for rank, text in logs.items():
        for line in text.splitlines():
            if line.startswith("RESULT "):
                _, r, name, value = line.split(" ", 3)
                results[(int(r), name)] = json.loads(value)
    assert code == 0, logs
    # loop: rank 1's node asked after step 7; step 8 is the last_step point. Rank 0's clock
    # at step 6 counts for both; rank 1's (always due) for neither.
    both = [[4, False, True], [6, False, True], [8, True, True]]
    assert results[(0, "loop")] == both and results[(1, "loop")] == both
    # script: rank 0 SIGTERMed itself after step 7: both stop at 9. Its clock at step 5 is its
    # own snapshot (it writes alone); rank 1 never snapshots by time.
    assert results[(0, "script")] == [[4, False, True], [5, False, True], [8, False, True], [9, True, False]]
    assert results[(1, "script")] == [[4, False, True], [8, False, True], [9, True, False]]
    # silent: rank 0 stepped 9 times with no collective; the ranks' next sum is intact.
    assert results[(0, "silent")] == [[[4, False, True], [8, False, True]], [3.0]]
    assert results[(1, "silent")] == [[], [3.0]]


def test_position_counts_steps_batches_and_epochs_and_resumes_in_place():
    agreement = StepAgreement(0, 1, every=5)
    held = agreement.position  # as a checkpoint target holds it
    assert [agreement.advance() for _ in range(3)] == [1, 2, 3]
    agreement.next_epoch()
    agreement.advance()
    assert held == Position(step=4, epoch=1, batch=1)
    agreement.resume_at(Position(step=40, epoch=3, batch=7))
    assert held is agreement.position and held == Position(step=40, epoch=3, batch=7)
    assert [s for s in range(1, 12) if agreement.is_point(s)] == [5, 10]
    assert StepAgreement(0, 1, every=5, last_step=7).is_point(7)
    with pytest.raises(ValueError, match="every=0"):
        StepAgreement(0, 1, every=0)
