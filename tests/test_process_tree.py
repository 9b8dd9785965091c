"""ProcessTree with real processes and real signals.

A fake ``paddle.distributed.launch`` (FAKE_LAUNCH, written to tmp_path) starts two
"workers" with ``start_new_session=True`` -- each its own session and process group,
as paddle does -- writes their pids to a file and waits like paddle: when a worker
exits non-zero it SIGTERMs the others' groups and exits 1. Every test checks, by
``(pid, start_ticks)``, that nothing it started survives.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from paddlerun.trainer.rundir.process_identity import ProcessIdentity
from paddlerun.launcher import parent_death
from paddlerun.launcher.process_tree import (
    ProcessTree,
    become_subreaper,
    describe_exit,
    is_subreaper,
    signal_name,
)

FAKE_LAUNCH = r'''
import json, os, signal, subprocess, sys, time
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

pidfile, worker_mode, exit_code = sys.argv[1], sys.argv[2], int(sys.argv[3])
WORKER = r"""
import os, signal, sys, time
mode, flag = sys.argv[1], sys.argv[2]
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "handle_term":
    def on_term(signum, frame):
        open(flag, "w").write("handled")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
open(flag + ".ready", "w").close()   # signal dispositions are in place
if mode == "exit0":
    sys.exit(0)
deadline = time.monotonic() + 60   # never outlive a broken test by much
while time.monotonic() < deadline:
    time.sleep(0.05)
"""
workers = [
    subprocess.Popen([sys.executable, "-c", WORKER, worker_mode, f"{pidfile}.flag{i}"],
                     start_new_session=True)
    for i in range(2)
]
deadline = time.monotonic() + 20
while not all(os.path.exists(f"{pidfile}.flag{i}.ready") for i in range(2)):
    if time.monotonic() > deadline:
        sys.exit("workers never got ready")
    time.sleep(0.01)
info = {"launch": [os.getpid(), ProcessIdentity.me().start_ticks],
        "workers": [[w.pid, ProcessIdentity.of(w.pid).start_ticks] for w in workers]}
with open(pidfile + ".tmp", "w") as f:
    json.dump(info, f)
os.replace(pidfile + ".tmp", pidfile)
while True:
    codes = [w.poll() for w in workers]
    if all(c is not None for c in codes):
        sys.exit(exit_code)
    if any(c not in (None, 0) for c in codes):
        for w in workers:
            if w.poll() is None:
                try:
                    os.killpg(w.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for w in workers:
            w.wait(timeout=10)
        sys.exit(1)
    time.sleep(0.05)
'''


# ----------------------------------------------------------------- helpers


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def alive(pid: int, start_ticks: int) -> bool:
    return ProcessIdentity(pid, start_ticks).alive()


def assert_all_dead(pairs, timeout_s: float = 5.0) -> None:
    pairs = [tuple(p) for p in pairs]
    try:
        wait_for(lambda: not any(alive(*p) for p in pairs), timeout_s, "processes to die")
    except AssertionError:
        survivors = [p for p in pairs if alive(*p)]
        for pid, _ in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"processes survived: {survivors}")


def read_pids(pidfile) -> dict:
    """The fake launcher writes it once both workers have set up their signal handling."""
    wait_for(lambda: os.path.exists(pidfile), 10.0, f"{pidfile}")
    with open(pidfile) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def pytest_as_subreaper():
    """Each test runs with pytest as a child subreaper; afterwards it is reset and
    every child of pytest must be gone.

    Why: workers orphaned when a fake launcher dies would otherwise go to init,
    which may reap them late (or, in a container whose PID 1 is no init, never),
    leaving zombies behind after the run. Here pytest inherits them and reaps them. The tree owner of the "not a subreaper" case is a
    separate process (OWNER) whose orphans therefore go to someone else.
    """
    assert become_subreaper()
    try:
        yield
    finally:
        me = psutil.Process()
        leftovers = [c for c in me.children(recursive=True)
                     if c.status() != psutil.STATUS_ZOMBIE]
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for child in me.children():  # reap (ours only: no other Popen is pending now)
            try:
                child.wait(timeout=5)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
                pass
        become_subreaper(enable=False)
    assert not leftovers, f"test left processes behind: {leftovers}"
    assert not is_subreaper()


@pytest.fixture
def fake_launch(tmp_path):
    script = tmp_path / "fake_launch.py"
    script.write_text(FAKE_LAUNCH)
    trees = []

    def make(worker_mode: str = "sleep", exit_code: int = 0, **tree_kwargs):
        pidfile = str(tmp_path / f"pids-{len(trees)}.json")
        tree = ProcessTree([sys.executable, str(script), pidfile, worker_mode, str(exit_code)],
                           env=dict(os.environ), cwd=str(tmp_path), **tree_kwargs)
        trees.append(tree)
        return tree, pidfile

    yield make
    for tree in trees:  # whatever a failing test left behind
        tree.close(term_timeout_s=1.0)


# ------------------------------------------------------------------- names


def test_signal_name_and_describe_exit():
    assert signal_name(-9) == "SIGKILL"
    assert signal_name(9) == "SIGKILL"
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(-200) == "signal 200"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"
    assert describe_exit(137) == "exit code 137 (128 + SIGKILL)"


# ------------------------------------------------------------- lifecycle


def test_exit_code_propagates(fake_launch):
    tree, pidfile = fake_launch(worker_mode="exit0", exit_code=3)
    tree.start()
    assert tree.pid > 0 and tree.identity == ProcessIdentity.of(tree.pid)
    info = read_pids(pidfile)
    assert wait_for(lambda: tree.poll() is not None, 10.0, "launch exit")
    assert tree.poll() == 3
    assert describe_exit(tree.poll()) == "exit code 3"
    assert tree.members() == []
    report = tree.close(term_timeout_s=1.0)
    assert [(r["pid"], r["how"]) for r in report] == [(tree.pid, "exited")]
    assert tree.poll() == 3
    assert_all_dead([info["launch"], *info["workers"]])


def test_killed_worker_shows_in_members_and_poll(fake_launch):
    tree, pidfile = fake_launch()
    tree.start()
    info = read_pids(pidfile)
    workers = [tuple(w) for w in info["workers"]]
    members = wait_for(lambda: len(tree.members()) == 3 and tree.members(), 5.0, "3 members")
    assert members[0].pid == tree.pid  # launch process first
    assert {p.pid for p in members} == {tree.pid, workers[0][0], workers[1][0]}

    os.kill(workers[0][0], signal.SIGKILL)
    wait_for(lambda: workers[0][0] not in {p.pid for p in tree.members()}, 5.0,
             "killed worker to leave members()")
    # Like paddle's launcher, the fake one tears down the other worker and exits 1.
    assert wait_for(lambda: tree.poll() is not None, 10.0, "launch exit")
    assert tree.poll() == 1
    assert wait_for(lambda: tree.members() == [], 5.0, "no members")
    assert tree.close(term_timeout_s=1.0) == [
        {"pid": tree.pid, "start_ticks": tree.identity.start_ticks,
         "name": os.path.basename(sys.executable), "cmdline": tree.argv, "how": "exited"}]
    assert_all_dead([info["launch"], *workers])


def test_close_terminates_everything_and_is_idempotent(fake_launch):
    tree, pidfile = fake_launch()
    tree.start()
    info = read_pids(pidfile)
    wait_for(lambda: len(tree.members()) == 3, 5.0, "3 members")
    t0 = time.monotonic()
    report = tree.close(term_timeout_s=60.0)
    # nobody ignores SIGTERM: close returns once all have exited, not after the 60 s
    assert time.monotonic() - t0 < 30.0
    assert {r["pid"] for r in report} == {info["launch"][0], *(w[0] for w in info["workers"])}
    assert {r["how"] for r in report} == {"SIGTERM"}
    assert tree.poll() == -signal.SIGTERM
    assert_all_dead([info["launch"], *info["workers"]], timeout_s=0.5)
    assert tree.close() == []
    assert tree.close(term_timeout_s=0.0) == []
    assert tree.poll() == -signal.SIGTERM


def test_worker_ignoring_sigterm_is_sigkilled_after_timeout(fake_launch):
    tree, pidfile = fake_launch(worker_mode="ignore_term")
    tree.start()
    info = read_pids(pidfile)
    wait_for(lambda: len(tree.members()) == 3, 5.0, "3 members")
    t0 = time.monotonic()
    report = tree.close(term_timeout_s=0.5, kill_timeout_s=60.0)
    elapsed = time.monotonic() - t0
    # waited out the SIGTERM timeout, then SIGKILL: gone at once, not after the 60 s
    assert 0.5 <= elapsed < 30.0
    how = {r["pid"]: r["how"] for r in report}
    assert how[tree.pid] == "SIGTERM"
    for pid, _ in info["workers"]:
        assert how[pid] == "SIGKILL"
    assert_all_dead([info["launch"], *info["workers"]], timeout_s=0.5)


def test_stopped_worker_gets_sigcont_and_handles_sigterm(fake_launch):
    tree, pidfile = fake_launch(worker_mode="handle_term")
    tree.start()
    info = read_pids(pidfile)
    wait_for(lambda: len(tree.members()) == 3, 5.0, "3 members")
    stopped_pid = info["workers"][0][0]
    os.kill(stopped_pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(stopped_pid).status() == psutil.STATUS_STOPPED, 5.0,
             "worker to stop")
    assert stopped_pid in {p.pid for p in tree.members()}  # stopped is alive
    t0 = time.monotonic()
    report = tree.close(term_timeout_s=10.0)
    # SIGCONT after SIGTERM: the handler runs at once, no 10 s wait for SIGKILL.
    assert time.monotonic() - t0 < 5.0
    assert {r["pid"]: r["how"] for r in report}[stopped_pid] == "SIGTERM"
    assert open(f"{pidfile}.flag0").read() == "handled"
    assert_all_dead([info["launch"], *info["workers"]], timeout_s=0.5)


def test_stopped_worker_ignoring_sigterm_is_sigkilled(fake_launch):
    tree, pidfile = fake_launch(worker_mode="ignore_term")
    tree.start()
    info = read_pids(pidfile)
    wait_for(lambda: len(tree.members()) == 3, 5.0, "3 members")
    for pid, _ in info["workers"]:
        os.kill(pid, signal.SIGSTOP)
    report = tree.close(term_timeout_s=0.3)
    how = {r["pid"]: r["how"] for r in report}
    assert [how[pid] for pid, _ in info["workers"]] == ["SIGKILL", "SIGKILL"]
    assert_all_dead([info["launch"], *info["workers"]], timeout_s=0.5)


def test_add_known_process_is_a_member_and_gets_closed(fake_launch, tmp_path):
    tree, pidfile = fake_launch(worker_mode="exit0", exit_code=0)
    tree.start()
    # A process the tree cannot find by itself: not a descendant, no marker, and
    # (double fork) not our child either -- like a worker known from its heartbeat.
    env = {k: v for k, v in os.environ.items() if k != tree.marker}
    spawn = textwrap.dedent("""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        print(p.pid)
    """)
    out = subprocess.run([sys.executable, "-c", spawn], env=env, capture_output=True,
                         text=True, timeout=10, check=True)
    stray_pid = int(out.stdout)
    key = ProcessIdentity.of(stray_pid)
    try:
        assert stray_pid not in {p.pid for p in tree.members()}
        tree.add_known(ProcessIdentity(stray_pid, key.start_ticks + 5))  # another start: a reused pid, ignored
        assert stray_pid not in {p.pid for p in tree.members()}
        tree.add_known(key)
        assert stray_pid in {p.pid for p in tree.members()}
        report = tree.close(term_timeout_s=2.0)
        assert {r["pid"]: r["how"] for r in report}[stray_pid] == "SIGTERM"
    finally:
        assert_all_dead([(key.pid, key.start_ticks)])


OWNER = r"""
# Owns a ProcessTree like the supervisor does; prints a JSON report.
# argv: fake_launch.py pidfile worker_mode term_timeout_s subreaper(yes|no)
import json, os, signal, sys, time
import psutil
from paddlerun.launcher.process_tree import ProcessTree, become_subreaper, is_subreaper

script, pidfile, worker_mode, term_timeout_s, subreaper = sys.argv[1:6]
out = {"subreaper_before": is_subreaper(), "owner": os.getpid()}
if subreaper == "yes":
    out["become"] = become_subreaper()
out["subreaper"] = is_subreaper()

def wait_for(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)

tree = ProcessTree([sys.executable, script, pidfile, worker_mode, "0"], env=dict(os.environ))
tree.start()
try:
    wait_for(lambda: os.path.exists(pidfile), 10, "pidfile")
    info = json.load(open(pidfile))
    out["info"] = info
    workers = info["workers"]
    if subreaper == "yes":
        wait_for(lambda: len(tree.members()) == 3, 5, "3 members")
    # else: members() is never called before the kill -- the workers are found by
    # the tree's environment marker only.
    os.kill(tree.pid, signal.SIGKILL)
    # Do not poll(): the launch process stays a zombie while we reap the others.
    wait_for(lambda: psutil.Process(tree.pid).status() == psutil.STATUS_ZOMBIE, 5, "launch zombie")
    wait_for(lambda: all(psutil.Process(w[0]).ppid() != tree.pid for w in workers), 5,
             "workers re-parented")
    out["orphan_ppids"] = [psutil.Process(w[0]).ppid() for w in workers]
    out["members_after_kill"] = sorted(p.pid for p in tree.members())
    if subreaper == "yes":
        # A dead orphan is our zombie until reaped; reaping must not touch the launch pid.
        os.kill(workers[0][0], signal.SIGKILL)
        wait_for(lambda: psutil.Process(workers[0][0]).status() == psutil.STATUS_ZOMBIE, 5,
                 "worker zombie")
        tree.reap_orphans()
        out["zombie_reaped"] = not psutil.pid_exists(workers[0][0])
    out["launch_rc"] = tree.poll()
    out["report"] = tree.close(term_timeout_s=float(term_timeout_s))
    out["members_after_close"] = [p.pid for p in tree.members()]
    out["children"] = [c.pid for c in psutil.Process().children()]
finally:
    tree.close(term_timeout_s=1.0)
print(json.dumps(out))
"""


def run_owner(tmp_path, worker_mode, term_timeout_s, subreaper):
    script = tmp_path / "fake_launch.py"
    script.write_text(FAKE_LAUNCH)
    owner = tmp_path / "owner.py"
    owner.write_text(OWNER)
    pidfile = str(tmp_path / "pids.json")
    proc = subprocess.run(
        [sys.executable, str(owner), str(script), pidfile, worker_mode, str(term_timeout_s),
         subreaper],
        capture_output=True, text=True, timeout=30,
    )
    info = json.loads(open(pidfile).read()) if os.path.exists(pidfile) else None
    return proc, info


@pytest.mark.parametrize("worker_mode,term_timeout_s,expected_how",
                         [("sleep", 3.0, "SIGTERM"), ("ignore_term", 0.3, "SIGKILL")])
def test_subreaper_owner_kills_orphans_after_launch_sigkill(tmp_path, worker_mode,
                                                            term_timeout_s, expected_how):
    proc, info = run_owner(tmp_path, worker_mode, term_timeout_s, subreaper="yes")
    try:
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["subreaper_before"] is False
        assert out["become"] is True and out["subreaper"] is True
        workers = out["info"]["workers"]
        assert out["orphan_ppids"] == [out["owner"], out["owner"]]
        assert out["members_after_kill"] == sorted(w[0] for w in workers)
        assert out["zombie_reaped"] is True
        assert out["launch_rc"] == -signal.SIGKILL  # reap_orphans left it to Popen
        how = {r["pid"]: r["how"] for r in out["report"]}
        assert how == {out["info"]["launch"][0]: "exited", workers[1][0]: expected_how}
        assert out["members_after_close"] == []
        assert out["children"] == []  # everything reaped, no zombie left
    finally:
        if info:
            assert_all_dead([info["launch"], *info["workers"]])


def test_owner_without_subreaper_still_finds_and_kills_orphans(tmp_path):
    """The orphans go to another process (here pytest, the nearest subreaper; in
    production possibly init); the owner never looked at them before the launch
    process died, so only the environment marker finds them."""
    proc, info = run_owner(tmp_path, "sleep", 3.0, subreaper="no")
    try:
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["subreaper"] is False
        workers = out["info"]["workers"]
        assert out["orphan_ppids"] == [os.getpid(), os.getpid()]
        assert out["members_after_kill"] == sorted(w[0] for w in workers)
        assert out["launch_rc"] == -signal.SIGKILL
        how = {r["pid"]: r["how"] for r in out["report"]}
        assert how == {out["info"]["launch"][0]: "exited",
                       workers[0][0]: "SIGTERM", workers[1][0]: "SIGTERM"}
        assert out["members_after_close"] == []
    finally:
        if info:
            assert_all_dead([info["launch"], *info["workers"]])


def test_close_signals_members_never_their_process_group(fake_launch):
    """A member's process group number may hold processes that are not the tree's (a group
    id freed and reused by another session): teardown signals members by pid, never a group."""
    tree, _ = fake_launch(worker_mode="exit0", exit_code=0)
    tree.start()
    # Another session: its leader and a bystander child stay out of the tree; a second
    # child, in the same process group, is registered like a worker from a heartbeat.
    env = {k: v for k, v in os.environ.items() if k != tree.marker}
    session = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import subprocess, sys, time
            kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                    for _ in range(2)]
            print(kids[0].pid, kids[1].pid, flush=True)
            time.sleep(60)
        """)], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        member_pid, bystander_pid = map(int, session.stdout.readline().split())
        assert os.getpgid(member_pid) == os.getpgid(bystander_pid) == session.pid
        member = ProcessIdentity.of(member_pid)
        tree.add_known(member)
        report = tree.close(term_timeout_s=2.0)
        assert {r["pid"]: r["how"] for r in report}[member_pid] == "SIGTERM"
        assert_all_dead([(member.pid, member.start_ticks)])
        assert ProcessIdentity.of(bystander_pid).alive(), "a process of the group that is not ours"
        assert session.poll() is None, "the group's leader, not ours either"
    finally:
        os.killpg(session.pid, signal.SIGKILL)
        session.wait(timeout=10)


@pytest.mark.skipif(parent_death.setpriv() is None, reason="no setpriv with --pdeathsig")
def test_a_launch_behind_setpriv_is_tracked_as_the_launch_process_itself(fake_launch):
    """setpriv execs the launch command in place: the tree's pid and identity are the launch
    process's own (as it reports them itself), and so is its command line."""
    tree, pidfile = fake_launch(parent_death_signal=signal.SIGKILL)
    tree.start()
    info = read_pids(pidfile)
    assert info["launch"] == [tree.pid, tree.identity.start_ticks]
    assert psutil.Process(tree.pid).cmdline() == tree.argv
    members = wait_for(lambda: len(tree.members()) == 3 and tree.members(), 5.0, "3 members")
    assert members[0] == tree.identity
    report = tree.close(term_timeout_s=3.0)
    assert {r["pid"] for r in report} == {tree.pid, *(w[0] for w in info["workers"])}
    assert_all_dead([info["launch"], *info["workers"]])


def test_a_tree_with_a_parent_death_signal_is_started_from_the_main_thread_only(fake_launch):
    """The kernel sends the signal when the thread that forked the child exits."""
    tree, _ = fake_launch(parent_death_signal=signal.SIGKILL)
    errors = []

    def start():
        try:
            tree.start()
        except RuntimeError as e:
            errors.append(str(e))
    thread = threading.Thread(target=start)
    thread.start()
    thread.join(timeout=10)
    assert errors and "main thread" in errors[0]
    assert tree.pid == 0
