"""Everything that runs inside a training worker.

This package's ``__init__`` is paddle-free, and so are its two subpackages the supervisor
imports: :mod:`.rundir` (the run-directory protocol both sides speak) and :mod:`.checkpoint`
(the snapshot store). Modules that need paddle import it themselves.
"""
