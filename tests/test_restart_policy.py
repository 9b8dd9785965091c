"""The restart policy: budget, window, no-progress rule and backoff (pure: no processes)."""
import dataclasses

import pytest

from paddlerun.launcher import root_cause
from paddlerun.launcher.missing_nodes import MissingNodes
from paddlerun.launcher.restart_policy import Failure, FailureKind, RestartPolicy
from paddlerun.trainer.rundir.config import SupervisorConfig

CONFIG = SupervisorConfig(max_restarts=5, backoff_s=1.0, backoff_max_s=3.0, failure_window_s=100.0,
                          max_failures_in_window=4)


def failure(t, progressed=True, kind=FailureKind.WORKER_DIED, cause="rank 1 killed by SIGKILL",
            retriable=True, **typed):
    return Failure(attempt=0, time=t, kind=kind, cause=cause, progressed=progressed,
                   retriable=retriable, **typed)


def decide(*failures, config=CONFIG):
    return RestartPolicy(config).decide(list(failures), now=failures[-1].time)


def test_a_first_failure_after_training_restarts_at_once():
    d = decide(failure(10))
    assert d.restart and d.delay_s == 0.0


def test_a_first_failure_before_any_step_waits_backoff_s():
    d = decide(failure(10, progressed=False))
    assert d.restart and d.delay_s == 1.0


@pytest.mark.parametrize("count, delay", [(2, 2.0), (3, 3.0)])  # 1 s doubling, capped at 3 s
def test_failures_close_together_back_off_exponentially(count, delay):
    d = decide(*[failure(10 + i) for i in range(count)])
    assert d.restart and d.delay_s == delay


def test_failures_outside_the_window_do_not_add_to_the_backoff():
    d = decide(failure(0), failure(50), failure(300))
    assert d.restart and d.delay_s == 0.0


def test_too_many_failures_in_the_window_give_up():
    d = decide(*[failure(10 + i) for i in range(4)])
    assert not d.restart and "failure_window_s" in d.reason


def test_the_restart_budget_gives_up():
    config = dataclasses.replace(CONFIG, max_restarts=2)
    d = decide(failure(0), failure(200), failure(400), config=config)
    assert not d.restart and "max_restarts=2" in d.reason


def test_two_attempts_failing_alike_before_their_first_step_give_up():
    same = dict(progressed=False, kind=FailureKind.WORKER_EXIT, cause="rank 1 exited with code 1",
                rank=1, exit_code=1)
    d = decide(failure(0, **same), failure(5, **same))
    assert not d.restart and "before their first step" in d.reason


def test_the_same_exception_on_another_rank_with_another_message_is_the_same_failure():
    # Compared by kind and exception type, never by message text (which names paths, ranks).
    a = failure(0, progressed=False, kind=FailureKind.ERROR, cause="ValueError: /data/a missing",
                rank=0, error_type="ValueError")
    b = failure(5, progressed=False, kind=FailureKind.ERROR, cause="ValueError: bad shape 3",
                rank=1, error_type="ValueError")
    assert not decide(a, b).restart
    c = dataclasses.replace(b, error_type="KeyError", cause="KeyError: 'x'")
    assert decide(a, c).restart


def test_failures_alike_only_in_their_message_prefix_are_not_the_same():
    # Before typed kinds, "rank 1 ..." causes were compared up to the first ':'.
    a = failure(0, progressed=False, kind=FailureKind.WORKER_DIED, rank=1, exit_code=-9)
    b = failure(5, progressed=False, kind=FailureKind.WORKER_DIED, rank=1, exit_code=-11,
                cause="rank 1 killed by SIGSEGV")
    assert decide(a, b).restart


def test_failure_kinds_are_an_enum_and_unknown_kinds_are_refused():
    assert failure(0, kind="hang").kind is FailureKind.HANG  # a kind read back from JSON
    with pytest.raises(ValueError):
        failure(0, kind="worker_killed")  # never produced: no such kind


def test_a_fault_no_restart_can_fix_gives_up_at_once():
    d = decide(failure(0, retriable=False, cause="bad config"))
    assert not d.restart and "not retriable" in d.reason


def test_a_busy_checkpoint_directory_is_not_retried():
    """Another job holds the writer claim: a restart would only be refused again (and, at the
    budget's end, report the same thing several restarts later)."""
    busy = dataclasses.replace(
        failure(10, kind="error", cause="WriterBusyError: checkpoint directory /ck is already being "
                                        "written by another job: host h, pid 7"),
        error_type="WriterBusyError")
    d = decide(busy)
    assert not d.restart
    assert d.reason.startswith("the checkpoint directory belongs to another job: WriterBusyError")
    other = dataclasses.replace(busy, error_type="RuntimeError", cause="RuntimeError: boom")
    assert decide(other).restart, "only that error"


def test_a_node_that_never_joined_is_not_waited_for_again():
    """Without launch.rendezvous a restart would wait start_timeout_s for the node again, and
    again until the budget is spent: the root cause is reported once instead."""
    missing = root_cause.peer_missing(0, MissingNodes([1], True), nnodes=2, node_rank=0,
                                      master="10.0.0.5:6170", waited_s=180.0)
    assert missing.kind is FailureKind.PEER_MISSING and missing.kind.value == "peer_missing"
    d = decide(missing)
    assert not d.restart and "node 1 of 2 never joined" in d.reason
