"""Convert a snapshot to ``PREFIX.pdparams`` / ``PREFIX.pdopt``, the files ``paddle.Model.load``
and ``paddle.load`` read -- without importing paddle.

The format, as ``paddle.save`` writes a state dict in Paddle 3.3
(``paddle/framework/io.py``: ``_legacy_save`` -> ``_build_saved_state_dict``): a
``pickle`` (protocol 4) of a plain dict mapping each key to a numpy array, plain
values (the ``LR_Scheduler`` dict) as they are, plus ``"StructuredToParameterName@@"``
mapping keys to tensor names. ``paddle.load`` turns the arrays back into tensors;
``Model.load`` unpickles the dict itself and calls ``param.set_value(array)`` and
``optimizer.set_state_dict(dict)``, both of which take numpy arrays. So stdlib pickle
of numpy arrays *is* the format; no paddle object is ever pickled.

Two differences from ``paddle.save``, both deliberate:

- ``.pdparams`` has no name table: a snapshot keeps parameters by structured name
  (``conv1.weight``), not by paddle's tensor name (``conv2d_0.w_0``), and a made-up
  table would be a lie. Without it ``paddle.load`` takes its paddle-2.0 path and
  returns the same tensors, named "generated_tensor_*" instead of ``conv2d_0.w_0``;
  ``set_state_dict`` and ``Model.load`` match by structured name, so nothing changes.
- ``.pdopt``: optimizer keys are paddle's own (``linear_0.w_0_moment1_0``, key = tensor
  name), so the name table is exact -- unless the state has nested dicts
  (``master_weights/<param>`` in a snapshot, flattened with "/" by
  ``trainer/state.py``): ``paddle.save`` writes those without a name table too, and
  only then does ``paddle.load`` turn the nested arrays into tensors.

Optimizer state is keyed by paddle's parameter names, which depend on the order models
are built in a process: load it into a model built the same way (as for any .pdopt).
Writing pickle is fine; reading one executes code, which is why snapshots are
safetensors + JSON and this module never unpickles anything.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np

from paddlerun.trainer.checkpoint import CheckpointError, SnapshotInfo
from paddlerun.trainer.rundir.atomic_file import atomic_write
from paddlerun.trainer.checkpoint.layout import (MODEL_FILE, OPTIMIZER_FILE, SHARD_PATTERN,
                                                 STATE_FILE)


#: paddle.save's protocol (paddle.save(..., protocol=4) is its default).
PICKLE_PROTOCOL = 4
NAME_TABLE_KEY = "StructuredToParameterName@@"
_SEP = "/"  # trainer/state.py flattens nested optimizer entries with it
_SUFFIXES = (".pdparams", ".pdopt")


@dataclass(frozen=True)
class Exported:
    params_path: Path
    params_tensors: int
    params_bytes: int
    opt_path: Path
    opt_tensors: int
    opt_extra: List[str]
    opt_bytes: int


def out_prefix(given: str) -> Path:
    """``OUT_PREFIX`` as ``Model.save``/``Model.load`` take it; ``x.pdparams`` means ``x``."""
    path = Path(given)
    if path.suffix in _SUFFIXES:
        path = path.with_suffix("")
    if not path.name:
        raise CheckpointError(f"OUT_PREFIX {given!r} has no file name; give e.g. exported/lenet", path)
    return path


def export(info: SnapshotInfo, prefix: Path) -> Exported:
    """Write ``prefix.pdparams`` and ``prefix.pdopt`` from a complete snapshot.

    Call it inside ``CheckpointStore.reading(...)`` so retention leaves the snapshot
    alone; every file is checked against the manifest's sha256 as it is read.
    """
    model = info.read_tensors(MODEL_FILE)
    optimizer = optimizer_arrays(info)
    state = info.read_json(STATE_FILE)
    extra = state.get("optimizer_extra", {}) if isinstance(state, dict) else {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{info.path / STATE_FILE}: 'optimizer_extra' is not an object", info.path)
    params = pdparams_object(model)
    opt = pdopt_object(optimizer, extra)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    params_path = Path(f"{prefix}.pdparams")
    opt_path = Path(f"{prefix}.pdopt")
    params_bytes = write_pickle(params_path, params)
    opt_bytes = write_pickle(opt_path, opt)
    return Exported(params_path, len(model), params_bytes, opt_path, len(optimizer),
                    sorted(extra), opt_bytes)


def optimizer_arrays(info: SnapshotInfo) -> Dict[str, np.ndarray]:
    """The optimizer tensors: ``optimizer.safetensors``, or every rank's shard merged (a
    sharded optimizer keeps each parameter's state on one rank only)."""
    files = info.files
    if OPTIMIZER_FILE in files:
        return info.read_tensors(OPTIMIZER_FILE)
    shards = sorted(name for name in files if SHARD_PATTERN.match(name))
    if not shards:
        raise CheckpointError(f"{info.path} holds no optimizer state (neither {OPTIMIZER_FILE} nor "
                              f"optimizer-rank-*.safetensors); it holds {', '.join(sorted(files))}",
                              info.path)
    merged: Dict[str, np.ndarray] = {}
    owner: Dict[str, str] = {}
    for name in shards:
        for key, array in info.read_tensors(name).items():
            if key in merged and not _same(merged[key], array):
                raise CheckpointError(f"{info.path}: optimizer entry {key!r} differs between "
                                      f"{owner[key]} and {name}; the shards disagree", info.path)
            merged[key], owner[key] = array, name
    return merged


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def pdparams_object(model: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    return {name: model[name] for name in sorted(model)}


def pdopt_object(optimizer: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """The optimizer state dict as paddle.save stores it: nested entries unflattened,
    ``optimizer_extra`` (``LR_Scheduler``) merged in, and the name table when flat."""
    state: Dict[str, Any] = {}
    nested = False
    for key in sorted(optimizer):
        head, sep, sub = key.partition(_SEP)
        if sep:
            nested = True
            group = state.setdefault(head, {})
            if not isinstance(group, dict):
                raise CheckpointError(f"optimizer entries {head!r} and {key!r} clash: one is a "
                                      f"tensor, the other a group")
            group[sub] = optimizer[key]
        else:
            if key in state:
                raise CheckpointError(f"optimizer entries {key!r} and {key}/... clash")
            state[key] = optimizer[key]
    for key, value in extra.items():
        if key in state:
            raise CheckpointError(f"optimizer entry {key!r} is both a tensor and in optimizer_extra")
        state[key] = value
    if not nested:
        state[NAME_TABLE_KEY] = {key: key for key in optimizer}
    return state


def write_pickle(path: Path, obj: Any) -> int:
    """Write ``obj`` as paddle.save does (pickle protocol 4), atomically; returns the size."""
    with atomic_write(path, durable=True) as f:
        pickle.dump(obj, f, protocol=PICKLE_PROTOCOL)
        return f.tell()
