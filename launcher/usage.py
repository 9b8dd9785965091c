""":class:`UsageError`, in a module of its own so that every command module raises the same
class the CLI catches -- also under ``python -m paddlerun.launcher.cli``, where the CLI
module runs as ``__main__`` and a command module importing ``paddlerun.launcher.cli``
would get a second copy of it, with a second, uncaught ``UsageError``."""


class UsageError(Exception):
    """Bad command line (a wrong kind of path, a missing optional extra); exit 2."""
