"""The launch command behind ``setpriv --pdeathsig``, and the fallbacks without a usable setpriv."""
import logging
import os
import signal
import sys

import pytest

from paddlerun.launcher import parent_death


@pytest.fixture(autouse=True)
def fresh_lookup():
    parent_death.setpriv.cache_clear()
    yield
    parent_death.setpriv.cache_clear()


def on_path(monkeypatch, directory):
    monkeypatch.setenv("PATH", str(directory))


def test_the_command_runs_behind_setpriv_where_it_has_pdeathsig():
    if parent_death.setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig")
    argv = [sys.executable, "-m", "paddle.distributed.launch", "train.py"]
    assert parent_death.command(argv, signal.SIGKILL) == \
        [parent_death.setpriv(), "--pdeathsig", "SIGKILL", "--", *argv]


def test_a_missing_program_fails_at_the_start_as_without_setpriv(tmp_path):
    if parent_death.setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig")
    with pytest.raises(FileNotFoundError):
        parent_death.command([str(tmp_path / "no-python"), "-m", "x"], signal.SIGKILL)
    with pytest.raises(FileNotFoundError):
        parent_death.command(["no-such-python-here", "-m", "x"], signal.SIGKILL, path=str(tmp_path))


def test_without_setpriv_the_command_runs_as_it_is_and_one_warning_says_so(tmp_path, monkeypatch, caplog):
    on_path(monkeypatch, tmp_path)  # an empty directory: no setpriv
    argv = [sys.executable, "-m", "paddle.distributed.launch"]
    with caplog.at_level(logging.WARNING, logger="paddlerun.supervisor"):
        assert parent_death.command(argv, signal.SIGKILL) == argv
        assert parent_death.command(argv, signal.SIGKILL) == argv
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "setpriv (util-linux) not found" in warnings[0]


def test_a_setpriv_without_pdeathsig_is_not_used(tmp_path, monkeypatch, caplog):
    old = tmp_path / "setpriv"  # util-linux < 2.33: its usage has no --pdeathsig
    old.write_text("#!/bin/sh\necho 'Usage: setpriv [options] <program> [<argument>...]'\n"
                   "echo ' --reuid <ruid>  set real uid'\n")
    old.chmod(0o755)
    on_path(monkeypatch, f"{tmp_path}{os.pathsep}/bin{os.pathsep}/usr/bin")
    argv = [sys.executable, "-c", "pass"]
    with caplog.at_level(logging.WARNING, logger="paddlerun.supervisor"):
        assert parent_death.command(argv, signal.SIGKILL) == argv
    assert "has no --pdeathsig" in caplog.text
