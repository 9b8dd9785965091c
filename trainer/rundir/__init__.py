"""The contract between the supervisor and its workers: paddle-free, so both sides import it.

The supervisor (``paddlerun.launcher``, ``paddlerun.cluster``) imports from
``paddlerun.trainer`` only this package and the checkpoint store
(``paddlerun.trainer.checkpoint``); ``tests/test_layout.py`` enforces it. What lives here is
what both sides read or write, or must agree on:

- the files of a run directory: the resolved config (:mod:`.config`), ``events.jsonl``
  (:mod:`.events`), heartbeats (:mod:`.heartbeat`), the stop request (:mod:`.control`),
  worker error records (:mod:`.errors`), metrics and ``summary.json`` (:mod:`.metrics`),
  and how they are rewritten (:mod:`.atomic_file`);
- the worker's environment (:mod:`.env`) and how a process is named across pid reuse
  (:mod:`.process_identity`);
- the parameter digest ``paddlerun ckpt digest`` prints and workers log (:mod:`.digest`),
  and which Paddle builds are supported (:mod:`.paddle_build`).

Nothing here imports paddle, directly or through another module.
"""
