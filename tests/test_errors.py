"""Worker error files: classified by type in the worker, read back (old files too) by the supervisor."""
import json

import pytest

from paddlerun.launcher import root_cause
from paddlerun.launcher.restart_policy import FailureKind
from paddlerun.trainer.rundir.config import ConfigError
from paddlerun.trainer.rundir.errors import (ErrorRecord, NotRetriable, PeerFailure, error_dir,
                                      is_peer_failure, is_retriable, read_errors, write_error)


def raised(exc):
    try:
        raise exc
    except BaseException as e:  # noqa: B902 - a traceback like a worker's
        return e


def test_our_unrecoverable_errors_are_not_retriable_by_type():
    from paddlerun.trainer.factories import FactoryError
    from paddlerun.trainer.state import StateMismatch
    for exc in (ConfigError("x"), FactoryError("x"), StateMismatch("x"),
                ModuleNotFoundError("x"), FileNotFoundError("x")):
        assert isinstance(exc, NotRetriable) or not is_retriable(exc), exc
        assert not is_retriable(exc), exc
    assert is_retriable(ValueError("x")) and is_retriable(RuntimeError("x"))


def test_a_users_exception_that_merely_shares_a_name_is_retriable():
    # The class name decided before: a user's own "ConfigError" gave up at once.
    ConfigErrorOfTheUser = type("ConfigError", (RuntimeError,), {})
    assert is_retriable(ConfigErrorOfTheUser("the user's own, transient"))


def test_peer_failures_by_type_and_gloos_text():
    assert is_peer_failure(PeerFailure("rank 1 went away"))  # any message
    assert is_peer_failure(RuntimeError("[gloo] Connection reset by peer"))
    assert not is_peer_failure(ValueError("Connection reset by peer"))  # not a collective's
    assert not is_peer_failure(RuntimeError("shape mismatch"))


def test_an_error_file_round_trips(tmp_path):
    write_error(tmp_path, 3, 1, raised(ConfigError("bad key")))
    record = read_errors(tmp_path, 3)[1]
    assert (record.rank, record.type, record.message) == (1, "ConfigError", "bad key")
    assert not record.retriable and not record.peer_failure
    assert "raise exc" in record.traceback
    assert [p.name for p in error_dir(tmp_path, 3).iterdir()] == ["rank-1.json"]  # no temp file


def test_an_old_error_file_without_the_classification_fields_is_read(tmp_path):
    # Written before "retriable" and "peer_failure" existed: retriable, not a peer failure.
    directory = error_dir(tmp_path, 0)
    directory.mkdir(parents=True)
    (directory / "rank-1.json").write_text(json.dumps(
        {"rank": 1, "pid": 42, "host": "h", "time": 5.0, "type": "KeyError", "message": "'w'",
         "traceback": "Traceback ..."}))
    (directory / "rank-0.json").write_text("{not json")  # skipped, not fatal
    assert read_errors(tmp_path, 0) == {1: ErrorRecord(rank=1, time=5.0, type="KeyError", message="'w'",
                                                       pid=42, host="h", traceback="Traceback ...")}
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    failure = root_cause.diagnose(FailureKind.WORKER_DIED, tmp_path, 0, log_dir, {}, dead={1: 1})
    assert (failure.kind, failure.rank, failure.error_type, failure.retriable) == \
        (FailureKind.ERROR, 1, "KeyError", True)


def test_a_peer_failure_is_the_root_cause_only_when_nothing_else_explains_it(tmp_path):
    write_error(tmp_path, 0, 0, raised(PeerFailure("peer died: rank 1")))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    alone = root_cause.diagnose(FailureKind.LAUNCH_EXIT, tmp_path, 0, log_dir, {}, returncode=1)
    assert (alone.kind, alone.rank) == (FailureKind.ERROR, 0)
    write_error(tmp_path, 0, 1, raised(ValueError("the real one")))
    both = root_cause.diagnose(FailureKind.LAUNCH_EXIT, tmp_path, 0, log_dir, {}, returncode=1)
    assert (both.rank, both.cause) == (1, "ValueError: the real one")


@pytest.mark.parametrize("kind", list(FailureKind))
def test_every_kind_reads_back_from_its_json_value(kind):
    assert FailureKind(json.loads(json.dumps(kind))) is kind
