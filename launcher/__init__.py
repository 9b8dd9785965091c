"""The supervisor: starts, watches and restarts the launch process tree. Never imports paddle."""
