"""Everything that runs inside a training worker.

This package's top level is paddle-free: the supervisor imports its config,
checkpoint store, digest and heartbeat modules. Modules that need paddle import
it themselves.
"""
