"""The parameter digest: how every test and tool compares two trained models.

sha256 over the parameters in sorted-name order; for each one its name, dtype,
shape and raw little-endian bytes. Paddle-free, so ``paddlerun ckpt digest``
computes the same value from a snapshot's safetensors file as a worker computes
from live tensors.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np


def params_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of ``{name: array}``; arrays must already be on the host."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        h.update(name.encode())
        h.update(b"\0" + a.dtype.str.lstrip("<|=").encode())
        h.update(b"\0" + ",".join(map(str, a.shape)).encode() + b"\0")
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()
