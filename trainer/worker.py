"""The script ``paddle.distributed.launch`` starts in every worker process.

Run as a file (the launcher takes a script path), so its directory is dropped from
``sys.path``: the package's own module names must not shadow anything.
"""
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from paddlerun.trainer.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
