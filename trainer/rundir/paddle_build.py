"""Which Paddle is installed, and whether paddlerun supports it -- read without importing paddle.

The supervisor (``paddlerun run``) and ``paddlerun doctor`` must answer in well under a
second and must not depend on a Paddle that may be broken, so nothing here imports it:
the version and the build (CUDA, cuDNN, NCCL) come from ``paddle/version/__init__.py``,
a file of plain assignments that Paddle's setup generates, parsed with :mod:`ast`; the
package names come from the installed distributions' metadata.

Supported: Paddle :data:`MINIMUM` and newer (docs/install.md says what CI tests). Paddle 2.6
is refused: its generator state, serialized, no longer holds the CPU random engine's
position (three ints: device, seed, offset), so a resumed run would draw other random
numbers than the run that never stopped -- bit-exact resume cannot be kept there.

Run as a script (``python paddle_build.py``) it prints :func:`read`'s answer as JSON:
that is how the supervisor asks a different interpreter (``launch.python``).
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

#: The oldest Paddle paddlerun runs on.
MINIMUM = "3.0.0"
#: The distributions that install the ``paddle`` module (CPU and CUDA builds).
DISTRIBUTIONS = ("paddlepaddle", "paddlepaddle-gpu")
_ANSWER_TIMEOUT_S = 30


class PaddleNotSupported(RuntimeError):
    """The installed Paddle is older than :data:`MINIMUM` (the message names both)."""


@dataclass(frozen=True)
class PaddleBuild:
    """One installed Paddle, as its files describe it."""
    #: ``paddle.__version__`` (e.g. ``3.2.2``); ``0.0.0`` for a development build.
    version: str
    #: Where the ``paddle`` package is.
    location: str
    #: The installed distributions that provide it, as ``name==version`` (two means a broken
    #: install: their files overwrite each other).
    distributions: Tuple[str, ...] = ()
    #: Build facts; None where the build has none (a CPU build has no CUDA).
    cuda: Optional[str] = None
    cudnn: Optional[str] = None
    nccl: Optional[str] = None
    #: The installed protobuf's version (None if absent).
    protobuf: Optional[str] = None
    #: Fleet's DistributedStrategy reads ``FieldDescriptor.label`` (Paddle 3.0.0-3.3.0), which
    #: protobuf 7 removed: with protobuf >= 7 every fleet strategy getter fails there.
    fleet_reads_protobuf_label: bool = False

    @property
    def with_cuda(self) -> bool:
        return self.cuda is not None

    def unsupported_reason(self) -> Optional[str]:
        """One line naming the installed and the minimum version, or None if supported."""
        if self.version == "0.0.0":  # a development build: its version says nothing
            return None
        if version_tuple(self.version) < version_tuple(MINIMUM):
            name = "paddlepaddle-gpu" if self.with_cuda else "paddlepaddle"
            return (f"Paddle {self.version} is installed ({self.location}), but paddlerun needs "
                    f"Paddle >= {MINIMUM}: pip install '{name}>={MINIMUM}' (GPU builds come from "
                    f"Paddle's own index, see docs/install.md)")
        return None

    def sharding_problem(self) -> Optional[str]:
        """Why fleet's sharded optimizer cannot start with this install, or None."""
        if self.fleet_reads_protobuf_label and self.protobuf and version_tuple(self.protobuf) >= (7,):
            return (f"Paddle {self.version}'s fleet cannot read its DistributedStrategy with protobuf "
                    f"{self.protobuf} (it uses FieldDescriptor.label, which protobuf 7 removed): "
                    f"pip install 'protobuf<7', or Paddle >= 3.3.1")
        return None

    def check(self) -> None:
        reason = self.unsupported_reason()
        if reason is not None:
            raise PaddleNotSupported(reason)


def version_tuple(version: str) -> Tuple[int, ...]:
    """``3.1.0rc1`` -> (3, 1, 0): the leading numbers, enough to compare releases."""
    parts = []
    for part in version.split(".")[:3]:
        match = re.match(r"\d+", part)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def read(python: Optional[str] = None) -> Optional[PaddleBuild]:
    """The Paddle of this interpreter, or of ``python`` (another interpreter, asked in a
    subprocess); None if it has none."""
    if python is not None and Path(python).resolve() != Path(sys.executable).resolve():
        return _read_in(python)
    spec = importlib.util.find_spec("paddle")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    location = Path(list(spec.submodule_search_locations)[0])
    facts = _version_file(location / "version" / "__init__.py")
    distributions = []
    for name in DISTRIBUTIONS:
        try:
            distributions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        protobuf = importlib.metadata.version("protobuf")
    except importlib.metadata.PackageNotFoundError:
        protobuf = None
    version = facts.get("full_version")
    if version is None and distributions:  # no version file: trust the metadata
        version = distributions[0].split("==")[1]
    return PaddleBuild(version=version or "unknown", location=str(location),
                       distributions=tuple(distributions),
                       cuda=_fact(facts.get("cuda_version")), cudnn=_fact(facts.get("cudnn_version")),
                       nccl=_fact(facts.get("nccl_version")), protobuf=protobuf,
                       fleet_reads_protobuf_label=_reads_protobuf_label(location))


def _reads_protobuf_label(location: Path) -> bool:
    """Whether fleet's strategy module uses ``FieldDescriptor.label`` (read as text, not run)."""
    try:
        source = (location / "distributed" / "fleet" / "base" / "distributed_strategy.py").read_text()
    except OSError:
        return False
    return "f.label" in source


def _version_file(path: Path) -> dict:
    """The top-level ``name = 'literal'`` assignments of Paddle's generated version file."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    facts = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)):
            facts[node.targets[0].id] = node.value.value
    return facts


def _fact(value) -> Optional[str]:
    """A build fact as the file holds it: 'False', 'None' or '0' mean none."""
    if value is None or str(value) in ("False", "None", "0", ""):
        return None
    return str(value)


def _read_in(python: str) -> Optional[PaddleBuild]:
    try:
        out = subprocess.run([python, str(Path(__file__).resolve())], capture_output=True,
                             text=True, timeout=_ANSWER_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise PaddleNotSupported(f"launch.python {python}: cannot ask it which Paddle it has: {e}") from e
    answer = json.loads(out)
    if answer is None:
        return None
    answer["distributions"] = tuple(answer["distributions"])
    return PaddleBuild(**answer)


if __name__ == "__main__":
    build = read()
    print(json.dumps(None if build is None else asdict(build)))
