"""The script ``paddle.distributed.launch`` starts in every worker process.

Run as a file (the launcher takes a script path), so its directory is dropped from
``sys.path``: the package's own module names must not shadow anything.
"""
import os
import sys

import logging

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from paddlerun.trainer.main import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    if code:
        # A failed worker is torn down and restarted: the interpreter's and Paddle's own
        # teardown would only delay the restart. Its error file and log are written;
        # snapshot threads are daemons, which an exit stops either way.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
