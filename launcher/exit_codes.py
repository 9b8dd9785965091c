"""The supervisor's exit codes (a contract with users and schedulers)."""
SUCCESS = 0
FAILED = 1
#: Bad usage or a bad config: never retried, by paddlerun or by a scheduler.
BAD_CONFIG = 2
#: Preempted after a final snapshot: requeue the job (or run the same command again)
#: and it resumes. 75 is EX_TEMPFAIL in sysexits.h: "try again later".
REQUEUE = 75
#: Stopped by Ctrl-C (SIGINT) after a final snapshot, as shells report 128 + SIGINT.
INTERRUPTED = 130
