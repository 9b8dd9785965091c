"""root_cause.diagnose on real log files: which rank is blamed, and whose log is quoted."""
from paddlerun.launcher import root_cause
from paddlerun.launcher.missing_nodes import MissingNodes
from paddlerun.trainer.rundir.heartbeat import NO_HEARTBEAT


def logs(tmp_path, launch="", **workers):
    log_dir = tmp_path / "logs" / "attempt-0"
    log_dir.mkdir(parents=True)
    (log_dir / "launch.log").write_text(launch)
    for name, text in workers.items():
        (log_dir / name.replace("_", ".")).write_text(text)
    return log_dir


def diagnose(tmp_path, log_dir, kind, **facts):
    return root_cause.diagnose(kind, tmp_path, 0, log_dir, {}, **facts)


def test_on_the_second_node_the_launchers_local_numbers_become_global_ranks(tmp_path):
    # Node 1 of 2-worker nodes: its launcher's "rank 0" and workerlog.0 are global rank 2.
    log_dir = logs(tmp_path, "Container rank 0 status failed cmd ['python'] code -9 log workerlog.0\n",
                   workerlog_0="rank 2 was here\n", workerlog_1="rank 3 was here\n")
    failure = diagnose(tmp_path, log_dir, "launch_exit", returncode=1, first_rank=2)
    assert (failure.rank, failure.cause) == (2, "rank 2 killed by SIGKILL")
    assert failure.detail == "rank 2 was here"
    hung = diagnose(tmp_path, log_dir, "hang", first_rank=2,
                    reasons={3: f"{NO_HEARTBEAT} for 61.0 s at step 9"})
    assert (hung.rank, hung.detail) == (3, "rank 3 was here")


def test_a_rank_whose_heartbeat_stopped_is_blamed_over_one_waiting_for_it(tmp_path):
    log_dir = logs(tmp_path)
    failure = diagnose(tmp_path, log_dir, "hang", reasons={
        0: "no progress for 60.2 s at step 9: the process is alive but its training thread is stuck",
        1: f"{NO_HEARTBEAT} for 61.0 s at step 9: the process is dead, stopped (SIGSTOP) or frozen"})
    assert failure.rank == 1 and failure.cause.startswith("rank 1 hung: no heartbeat")


def test_a_worker_that_aborted_because_its_peer_died_is_not_the_root_cause(tmp_path):
    log_dir = logs(tmp_path, workerlog_0="terminate called after throwing 'gloo::IoException'\n",
                   workerlog_1="step 7\n")
    failure = diagnose(tmp_path, log_dir, "worker_died", dead={0: -6, 1: -9})
    assert (failure.rank, failure.cause) == (1, "rank 1 killed by SIGKILL")


def test_nodes_that_never_joined_are_named_with_the_master_the_timeout_key_and_the_fix():
    failure = root_cause.peer_missing(3, MissingNodes([1, 3], True), nnodes=4, node_rank=0,
                                      master="10.0.0.5:6170", waited_s=180.2)
    text = root_cause.report(failure)
    assert ("root cause: nodes 1, 3 of 4 never joined: node 0 waited for them at the master "
            "10.0.0.5:6170 for 180 s (supervisor.start_timeout_s)") in text
    assert ("fix: start nodes 1, 3 with the same launch.master=10.0.0.5:6170 and launch.nnodes=4"
            in text and "launch.rendezvous" in text and "docs/elastic.md" in text), text
    assert (failure.attempt, failure.rank, failure.retriable, failure.progressed) == (3, None, False, False)


def test_when_the_master_does_not_answer_the_report_says_which_nodes_are_only_presumed_missing():
    failure = root_cause.peer_missing(0, MissingNodes([0], False), nnodes=2, node_rank=1,
                                      master="10.0.0.5:6170", waited_s=15)
    assert failure.cause.startswith("node 0 of 2 never joined: node 1 waited for it")
    assert "the master did not answer" in failure.cause
