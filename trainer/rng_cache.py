"""``np.random.get_state()`` and ``random.getstate()`` in about a microsecond each when
nothing drew since the last call.

The training loop captures every RNG state before each step, so that an emergency
snapshot resumes the failed step exactly (:mod:`trainer.loop`). Two of the three are
slow to read, for generators most models never draw from: ``np.random.get_state()``
builds a new 624-entry array and tuple each time (46 us, about 1 % of a LeNet step,
measured), ``random.getstate()`` a 625-entry tuple (9 us; Paddle's own takes 1 us).

Both are Mersenne Twisters whose whole state is ``key[624]`` and a position in one C
struct. Reading those 2,500 bytes tells whether anything drew since the last full read;
only then is the full state taken again. numpy publishes its struct's address
(``BitGenerator.ctypes.state_address``). CPython's ``_random.Random`` object is the
struct (``PyObject_HEAD; int index; uint32_t state[624]``): it is read just past the
object header, and only where the type is big enough to hold those bytes.

What the bytes do not show is a cached Gaussian, which can change without a draw:
numpy's ``has_gauss`` (while it is set, every call is a full read) and Python's
``gauss_next`` (compared by identity). Every full read also checks that the bytes say
what the full state says, and falls back to full reads for good if they ever do not
(another bit generator, another layout).
"""
from __future__ import annotations

import _random
import ctypes
import random
import sys
from typing import Any, Optional

import numpy as np

_MT19937_STATE_BYTES = 624 * 4 + 4  # uint32 key[624] and an int position, in either order


class _RawStateCache:
    """``get_state()`` returns the full state, reusing the last result (the same object:
    treat it as read-only) while the generator's raw C state is unchanged."""

    def __init__(self, fast: bool):
        self._fast = fast
        self._raw: Optional[bytes] = None
        self._state: Any = None

    def get_state(self):
        raw = self._read_raw() if self._fast else None
        if raw is not None and raw == self._raw and self._same_outside_raw(self._state):
            return self._state
        state = self._full_state()
        if raw is not None and not self._describes(raw, state):
            self._fast = False
            raw = None
        self._raw, self._state = raw, state
        return state

    def _read_raw(self) -> Optional[bytes]:
        raise NotImplementedError

    def _full_state(self):
        raise NotImplementedError

    def _same_outside_raw(self, state) -> bool:
        """Whether the part of ``state`` that the raw bytes do not hold is still current."""
        raise NotImplementedError

    def _describes(self, raw: bytes, state) -> bool:
        raise NotImplementedError


class NumpyRngReader(_RawStateCache):
    """What ``np.random.get_state()`` returns."""

    def __init__(self):
        super().__init__(fast=hasattr(np.random, "get_bit_generator"))  # numpy >= 1.25
        self._bit_generator = None
        self._address = 0

    def _read_raw(self) -> Optional[bytes]:
        bit_generator = np.random.get_bit_generator()
        if bit_generator is not self._bit_generator:  # np.random.set_bit_generator() swapped it
            if not isinstance(bit_generator, np.random.MT19937):
                return None
            self._bit_generator = bit_generator
            self._address = bit_generator.ctypes.state_address
        return ctypes.string_at(self._address, _MT19937_STATE_BYTES)

    def _full_state(self):
        return np.random.get_state()

    def _same_outside_raw(self, state) -> bool:
        return not state[3]  # no cached Gaussian

    def _describes(self, raw: bytes, state) -> bool:
        kind, key, pos = state[:3]
        return (kind == "MT19937" and raw[:-4] == np.ascontiguousarray(key, dtype=np.uint32).tobytes()
                and int.from_bytes(raw[-4:], "little", signed=True) == pos)


class PythonRngReader(_RawStateCache):
    """What ``random.getstate()`` returns (of the generator behind the ``random`` module's
    functions, or of ``generator``)."""

    def __init__(self, generator: Optional[random.Random] = None):
        self._generator = generator if generator is not None else random.getstate.__self__
        header = object.__basicsize__
        super().__init__(fast=sys.implementation.name == "cpython"
                         and isinstance(self._generator, _random.Random)
                         and _random.Random.__basicsize__ >= header + _MT19937_STATE_BYTES)
        self._address = id(self._generator) + header

    def _read_raw(self) -> Optional[bytes]:
        return ctypes.string_at(self._address, _MT19937_STATE_BYTES)

    def _full_state(self):
        return self._generator.getstate()

    def _same_outside_raw(self, state) -> bool:
        return self._generator.gauss_next is state[2]

    def _describes(self, raw: bytes, state) -> bool:
        internal = state[1]  # key[0..623], then the index
        return (len(internal) == 625 and int.from_bytes(raw[:4], "little", signed=True) == internal[-1]
                and raw[4:] == np.asarray(internal[:-1], dtype=np.uint32).tobytes())
