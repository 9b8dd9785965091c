"""``np.random.get_state()`` in about a microsecond when the state has not changed.

The training loop captures every RNG state before each step, so that an emergency
snapshot resumes the failed step exactly (:mod:`trainer.loop`). ``np.random.get_state()``
builds a new 624-entry array and tuple each time: 46 us, about 1 % of a LeNet step
(measured), for a generator most models never draw from.

The legacy global generator is an MT19937, whose whole state is ``key[624]`` and ``pos``
in one C struct that numpy publishes the address of (``BitGenerator.ctypes.state_address``).
Reading those 2,500 bytes tells whether anything drew since the last full read; only
then is the full ``get_state()`` taken again. The one part of the legacy state outside
that struct is the cached Gaussian (``has_gauss``), which can change without a draw: while
it is set, every call is a full read. Every full read also checks that the raw bytes say
what ``get_state()`` says, and falls back to full reads for good if they ever do not
(another bit generator, another numpy layout).
"""
from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np

_MT19937_STATE_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos


class NumpyRngReader:
    """``get_state()`` returns what ``np.random.get_state()`` would, reusing the last
    result (the same tuple: treat it as read-only) while the generator is untouched."""

    def __init__(self):
        self._fast = hasattr(np.random, "get_bit_generator")  # numpy >= 1.25
        self._bit_generator = None
        self._address = 0
        self._raw: Optional[bytes] = None
        self._state: Optional[tuple] = None

    def get_state(self) -> tuple:
        raw = self._read_raw() if self._fast else None
        if raw is not None and raw == self._raw and not self._state[3]:
            return self._state
        state = np.random.get_state()
        if raw is not None and not _describes(raw, state):
            self._fast = False
            raw = None
        self._raw, self._state = raw, state
        return state

    def _read_raw(self) -> Optional[bytes]:
        bit_generator = np.random.get_bit_generator()
        if bit_generator is not self._bit_generator:  # np.random.set_bit_generator() swapped it
            if not isinstance(bit_generator, np.random.MT19937):
                return None
            self._bit_generator = bit_generator
            self._address = bit_generator.ctypes.state_address
        return ctypes.string_at(self._address, _MT19937_STATE_BYTES)


def _describes(raw: bytes, state: tuple) -> bool:
    kind, key, pos = state[:3]
    return (kind == "MT19937" and raw[:-4] == np.ascontiguousarray(key, dtype=np.uint32).tobytes()
            and int.from_bytes(raw[-4:], "little", signed=True) == pos)
