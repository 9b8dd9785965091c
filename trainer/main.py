"""A worker process: ``paddle.distributed.launch ... trainer/worker.py --config RUN_DIR/config.yaml``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from paddlerun.trainer.rundir.config import load_config
from paddlerun.trainer.rundir.env import WorkerEnv
from paddlerun.trainer.rundir.errors import write_error
from paddlerun.trainer.rundir.heartbeat import HeartbeatWriter


def setup_logging(rank: int, attempt: int) -> None:
    level = os.environ.get("PADDLERUN_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, stream=sys.stdout,
                        format=f"%(asctime)s rank {rank} attempt {attempt} %(levelname)s %(name)s: "
                               f"%(message)s",
                        datefmt="%H:%M:%S", force=True)
    # Importing paddle 3.0-3.2 sets the root logger to WARNING (paddle.distributed's
    # get_logger(..., name="root")): our own loggers' level must not depend on the root's.
    logging.getLogger("paddlerun").setLevel(level)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the resolved config (RUN_DIR/config.yaml)")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    env = WorkerEnv.from_environ()
    run_dir = Path(args.run_dir)
    setup_logging(env.rank, env.attempt)
    log = logging.getLogger("paddlerun.worker")
    # Before importing paddle, so that a slow import shows as phase "init", not silence.
    heartbeat = HeartbeatWriter(run_dir / "heartbeats", env.rank, env.heartbeat_interval_s,
                                attempt=env.attempt, supervisor=env.supervisor).start()
    try:
        config = load_config(args.config)
        from paddlerun.trainer.worker_setup import run_worker  # imports paddle
        heartbeat.set_phase("init")
        summary = run_worker(config, env, run_dir, heartbeat)
        # Every rank logs its digest: tests compare them to prove the replicas agree.
        log.info("%s: %d steps, digest %s", summary["status"], summary["global_steps"],
                 summary["digest"])
        heartbeat.stop("stopped" if summary["status"] == "preempted" else "done")
        return 0
    except BaseException as e:  # noqa: B902 - the root cause must reach the supervisor
        if isinstance(e, SystemExit) and not e.code:
            raise
        write_error(run_dir, env.attempt, env.rank, e)
        log.exception("rank %d failed: %s: %s", env.rank, type(e).__name__, e)
        return 1
