"""The script ``paddle.distributed.launch`` starts in every worker process.

Run as a file (the launcher takes a script path), so its directory is dropped from
``sys.path``: the package's own module names must not shadow anything.
"""
import ctypes
import logging
import multiprocessing
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from paddlerun.trainer.main import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    if code and not multiprocessing.active_children():
        # A failed worker is torn down and restarted: Paddle's exit handlers and the
        # interpreter's teardown (~0.5 s, measured) would only delay the restart. Its
        # error file and log are written, and C stdio is flushed; snapshot threads are
        # daemons, which an exit stops either way. With DataLoader worker processes
        # (train.num_workers > 0) the normal exit runs: its handlers free their shared memory.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)
        os._exit(code)
    sys.exit(code)
