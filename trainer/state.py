"""Capture and restore the training state: paddle tensors to numpy arrays and JSON, and back.

Capture copies every tensor to host memory (the checkpointer copies into reused
buffers, :mod:`host_copy`; ``*_arrays`` here copy with ``Tensor.numpy()``), so the
training thread can go on while a background thread persists the copy. Non-tensor
state (LR scheduler, RNG states) becomes JSON: nothing here is ever pickled.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Tuple

import numpy as np
import paddle
from paddle.framework import core

from paddlerun.trainer.rundir.errors import NotRetriable
from paddlerun.trainer.host_copy import numpy_dtype
from paddlerun.trainer.paddle_features import features
from paddlerun.trainer.rng_cache import NumpyRngReader, PythonRngReader

# Optimizer state-dict entries that are plain data, not tensors.
_JSON_KEYS = ("LR_Scheduler",)
_SEP = "/"  # flattens nested optimizer entries such as master_weights/<param>


class StateMismatch(ValueError, NotRetriable):
    """A snapshot that does not fit the model being trained (names the first mismatch)."""


def unwrap(layer: paddle.nn.Layer) -> paddle.nn.Layer:
    """The user's layer inside ``paddle.DataParallel`` / fleet wrappers."""
    while hasattr(layer, "_layers"):
        layer = layer._layers
    return layer


def model_tensors(layer: paddle.nn.Layer) -> Dict[str, paddle.Tensor]:
    return dict(unwrap(layer).state_dict())


def model_arrays(layer: paddle.nn.Layer) -> Dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in model_tensors(layer).items()}


def optimizer_tensors(optimizer) -> Tuple[Dict[str, paddle.Tensor], Dict[str, Any]]:
    """(tensors, json-able rest) of ``optimizer.state_dict()``; nested entries flattened."""
    tensors: Dict[str, paddle.Tensor] = {}
    extra: Dict[str, Any] = {}
    for key, value in optimizer.state_dict().items():
        if key in _JSON_KEYS or not isinstance(value, (paddle.Tensor, dict)):
            extra[key] = value  # plain data (a Paddle version's own bookkeeping entries too)
        elif isinstance(value, dict):
            for sub, t in value.items():
                tensors[f"{key}{_SEP}{sub}"] = t
        else:
            tensors[key] = value
    return tensors, extra


def optimizer_arrays(optimizer) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """(arrays, json-able rest) of ``optimizer.state_dict()``."""
    tensors, extra = optimizer_tensors(optimizer)
    return {name: t.numpy() for name, t in tensors.items()}, extra


_CUDA_BUILD = features().cuda
_numpy_rng = NumpyRngReader()
_python_rng = PythonRngReader()


def capture_rng() -> tuple:
    """The RNG states as they are (cheap enough for every step: ~3 us); see :func:`rng_to_json`.

    ``paddle.get_rng_state()`` holds the generators of the current device only: on a GPU,
    the CUDA ones. A CUDA build also captures the CPU generator (ops placed on the CPU and
    the CPU generator's draws must resume as exactly); a CPU build has only that one."""
    cpu = paddle.get_rng_state("cpu") if _CUDA_BUILD else None
    return paddle.get_rng_state(), _numpy_rng.get_state(), _python_rng.get_state(), cpu


def rng_to_json(captured: tuple) -> Dict[str, Any]:
    """The captured RNG states as JSON, their long parts as strings: Paddle's generator
    state is ~6,000 bytes of text, and numpy's and Python's are 624 words each. As lists
    of ints the JSON was 40 KB and took ~0.9 ms to encode on the persist thread, holding
    the GIL against training; as strings, 16 KB and ~75 us (measured). Snapshots written
    with the lists still restore (:func:`restore_rng` reads both)."""
    paddle_states, np_state, py_state, cpu_states = captured
    state = {
        "paddle": [_paddle_generator_json(s.__getstate__()) for s in paddle_states],
        "numpy": [np_state[0], _words_hex(np_state[1]), *np_state[2:]],
        "python": [py_state[0], _words_hex(py_state[1]), py_state[2]],
    }
    if cpu_states is not None:
        state["paddle_cpu"] = [_paddle_generator_json(s.__getstate__()) for s in cpu_states]
    return state


def _paddle_generator_json(state: tuple) -> list:
    """``GeneratorState.__getstate__()``: a few ints, then (CPU generators) the engine's
    state as a list of byte values, which becomes a str (latin-1 maps every byte to one
    character). A state of ints only (a CUDA generator's device, seed and offset) is kept
    as it is: ``bytes()`` of an int would make that many zero bytes."""
    *head, engine = state
    if not isinstance(engine, (list, tuple)):
        return list(state)
    try:
        return [*head, bytes(engine).decode("latin-1")]
    except (TypeError, ValueError):  # not byte values after all: keep them as they are
        return [*head, list(engine)]


def _words_hex(words) -> str:
    """32-bit words (an MT19937 key, or Python's 624 words and index) as little-endian hex."""
    return np.asarray(words, dtype="<u4").tobytes().hex()


def _words(value) -> list:
    """:func:`_words_hex` undone; a list (as older snapshots hold them) is returned as it is."""
    if isinstance(value, str):
        return np.frombuffer(bytes.fromhex(value), dtype="<u4").tolist()
    return value


def rng_state() -> Dict[str, Any]:
    return rng_to_json(capture_rng())


def _generator_states(saved: list) -> list:
    generators = []
    for *head, engine in saved:
        # GeneratorState has no constructor; this is what pickle itself does (NEWOBJ + BUILD).
        g = core.GeneratorState.__new__(core.GeneratorState)
        g.__setstate__((*head, list(engine.encode("latin-1")) if isinstance(engine, str) else engine))
        generators.append(g)
    return generators


def restore_rng(state: Dict[str, Any]) -> None:
    if "paddle_cpu" in state:
        paddle.set_rng_state(_generator_states(state["paddle_cpu"]), "cpu")
    paddle.set_rng_state(_generator_states(state["paddle"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(_words(keys), dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(_words(internal)), gauss_next))


def check_model(layer: paddle.nn.Layer, arrays: Dict[str, np.ndarray], source: str) -> None:
    """Refuse ``arrays`` unless names, shapes and dtypes match the model exactly."""
    own = unwrap(layer).state_dict()
    for name, tensor in own.items():
        if name not in arrays:
            raise StateMismatch(f"{source}: has no parameter {name!r} that the model has; "
                                f"was it made by a different model?")
        if tuple(arrays[name].shape) != tuple(tensor.shape):
            raise StateMismatch(f"{source}: parameter {name!r} has shape {list(arrays[name].shape)} "
                                f"in the snapshot but {list(tensor.shape)} in the model; the model's "
                                f"shape changed since the snapshot was taken")
        want = numpy_dtype(tensor.dtype)
        if arrays[name].dtype != want:
            raise StateMismatch(f"{source}: parameter {name!r} is {arrays[name].dtype} in the "
                                f"snapshot but {want} in the model")
    extra = sorted(set(arrays) - set(own))
    if extra:
        raise StateMismatch(f"{source}: parameter {extra[0]!r} is not in the model")


def load_model(layer: paddle.nn.Layer, arrays: Dict[str, np.ndarray]) -> None:
    """Load ``arrays`` that :func:`check_model` accepted into ``layer``."""
    unwrap(layer).set_state_dict({name: paddle.to_tensor(a) for name, a in arrays.items()})


def restore_optimizer(optimizer, arrays: Dict[str, np.ndarray], extra: Dict[str, Any]) -> None:
    state: Dict[str, Any] = dict(extra)
    for key, a in arrays.items():
        head, sep, sub = key.partition(_SEP)
        if sep:
            state.setdefault(head, {})[sub] = paddle.to_tensor(a)
        else:
            state[key] = paddle.to_tensor(a)
    optimizer.set_state_dict(state)
