"""What the installed Paddle can do, found out once per worker, and the fallbacks taken.

Paddle 3.0 to 3.3 differ in things paddlerun relies on (docs/install.md, "Supported
Paddle versions"):

- **Writable DLPack views.** 3.3 exports versioned DLPack, which numpy imports writable;
  3.0-3.2 export only the legacy capsule (``__dlpack__(stream=None)``), which numpy 2
  imports read-only. The gradient sync writes through its view of the flat buffer, so
  there it uses a view made from the tensor's data pointer, shape and strides instead
  (:func:`paddlerun.trainer.host_copy.address_view`); read-only views for the capture
  still come from DLPack.
- **DLPack at all.** Paddle 2.6 has no ``Tensor.__dlpack__`` (it is refused anyway, see
  :mod:`.rundir.paddle_build`): every host view is then an address view.
- **The generator state.** Restoring bit-exact needs the CPU generator's serialized state
  to hold its engine (a list of byte values after device, seed, offset). Paddle 2.6 has
  only the three ints; a build like that is refused, never resumed inexactly.
- **Pinned host memory** (CUDA builds): the capture of GPU tensors goes into reused
  pinned buffers (``Tensor.pin_memory`` + ``Tensor.copy_``) where both exist, else into
  fresh memory with ``numpy()``.

:func:`features` runs the probes on its first call and logs each fallback once, then
returns the same answer for the life of the process.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import paddle

from paddlerun.trainer.rundir.paddle_build import MINIMUM, PaddleNotSupported, version_tuple

log = logging.getLogger("paddlerun.worker")


@dataclass(frozen=True)
class PaddleFeatures:
    version: str
    #: ``Tensor.__dlpack__`` exists: numpy views of host tensors through DLPack.
    dlpack: bool
    #: ``np.from_dlpack`` of a host tensor is writable (versioned DLPack, Paddle >= 3.3).
    dlpack_writable: bool
    #: A numpy view made from ``data_ptr()``, shape and strides is the tensor's memory (checked:
    #: writes through it show in the tensor and Paddle's in-place updates show in it).
    address_views: bool
    #: The CPU generator's serialized state holds its engine: resume restores it exactly.
    generator_engine_state: bool
    #: A CUDA build.
    cuda: bool
    #: GPU tensors can be copied into reused pinned host buffers.
    pinned_copy: bool
    #: What differs from the newest Paddle, one line each (logged once).
    fallbacks: Tuple[str, ...] = ()

    def check(self) -> None:
        """Raise :class:`PaddleNotSupported` where paddlerun's guarantees cannot be kept."""
        if self.version != "0.0.0" and version_tuple(self.version) < version_tuple(MINIMUM):
            raise PaddleNotSupported(f"Paddle {self.version} is installed, but paddlerun needs "
                                     f"Paddle >= {MINIMUM} (docs/install.md)")
        if not self.generator_engine_state:
            raise PaddleNotSupported(
                f"Paddle {self.version}: the CPU generator's state does not hold its engine, so "
                f"a resumed run would not be bit-exact; install Paddle >= {MINIMUM}")


@functools.lru_cache(maxsize=None)
def features() -> PaddleFeatures:
    """The installed Paddle's features; probed on the first call, fallbacks logged then."""
    found = probe()
    for line in found.fallbacks:
        log.info("Paddle %s: %s", found.version, line)
    return found


def probe() -> PaddleFeatures:
    """Run every probe now (tests call this; the code calls :func:`features`)."""
    dlpack = hasattr(paddle.Tensor, "__dlpack__")
    dlpack_writable = dlpack and _dlpack_writable()
    cuda = paddle.is_compiled_with_cuda()
    pinned = cuda and hasattr(paddle.Tensor, "pin_memory") and hasattr(paddle.Tensor, "copy_")
    address_views = _address_views_work()
    fallbacks = []
    if not (dlpack_writable or address_views):
        fallbacks.append("no writable host views: the gradient sync uses Paddle ops (concat, "
                         "split, set_value) instead of copies by address")
    elif not dlpack:
        fallbacks.append("no Tensor.__dlpack__: host tensors are viewed through their data pointers")
    elif not dlpack_writable:
        fallbacks.append("DLPack views are read-only (legacy capsule): the gradient sync writes "
                         "through a view made from the flat buffer's data pointer")
    if cuda and not pinned:
        fallbacks.append("no Tensor.pin_memory/copy_: GPU tensors are captured with numpy() "
                         "into fresh host memory")
    return PaddleFeatures(version=paddle.__version__, dlpack=dlpack, dlpack_writable=dlpack_writable,
                          address_views=address_views,
                          generator_engine_state=_generator_has_engine(), cuda=cuda,
                          pinned_copy=pinned, fallbacks=tuple(fallbacks))


def _dlpack_writable() -> bool:
    try:
        return bool(np.from_dlpack(paddle.zeros([1])).flags.writeable)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return False


def _address_views_work() -> bool:
    from paddlerun.trainer.host_copy import address_view  # host_copy imports this module
    try:
        tensor = paddle.zeros([4], dtype="float32")
        view = address_view(tensor)
        view[1] = 2.0
        tensor.scale_(3.0)
        return view.tolist() == [0.0, 6.0, 0.0, 0.0] and tensor.numpy().tolist() == view.tolist()
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return False


def _generator_has_engine() -> bool:
    """Whether ``GeneratorState.__getstate__()`` of the CPU generator ends in the engine's
    bytes (a list), not just (device, seed, offset)."""
    state = paddle.get_rng_state("cpu")[0].__getstate__()
    return len(state) >= 4 and isinstance(state[-1], (list, tuple))
