"""The documentation in the repository is there, current, and reachable.

- every relative Markdown link in README.md and docs/ resolves (the file, and the
  heading when the link names one);
- every ``docs/...`` page or image that code, tests, benches or examples mention exists
  (and the heading, when the mention ends in ``#heading``);
- nothing cites notes that are not in the repository;
- docs/config.md is what ``python -m paddlerun.trainer.rundir.config_doc`` prints;
- the README stays short enough to read in five minutes (at most 20 KB).
"""
import os
import re
from pathlib import Path

import pytest

from paddlerun.trainer.rundir import config_doc

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT_BYTES = 20 * 1024

#: Folders whose files are the project's own (not the venv, caches or run outputs).
_SKIP_DIRS = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache"}
#: Notes kept outside the repository, which nothing in it may cite (spelled in pieces so
#: that this file does not cite them itself).
_OUTSIDE_NOTES = ("DESIGN" + ".md", "PADDLE_NOTES", "STYLE" + ".md", "../" + "shared")

_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_DOCS_MENTION = re.compile(r"\bdocs/[\w./-]+\.(?:md|png)(?:#[\w-]+)?")
_CODE_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def project_files(*suffixes):
    """The project's files whose suffix (or, for suffix-less files, name) is in ``suffixes``."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in suffixes or name in suffixes:
                yield path


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: Path) -> set:
    text = _CODE_FENCE.sub("", markdown.read_text(encoding="utf-8"))
    seen, result = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def broken_target(source: Path, target: str) -> str:
    """Why ``target`` (relative to ``source``) does not resolve, or '' if it does."""
    if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
        return ""
    path_part, _, anchor = target.partition("#")
    path = (source.parent / path_part).resolve() if path_part else source
    if not path.exists():
        return f"{path.relative_to(ROOT) if ROOT in path.parents else path} does not exist"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"{path.name} has no heading with the anchor #{anchor}"
    return ""


@pytest.mark.parametrize("markdown", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(markdown):
    text = _CODE_FENCE.sub("", markdown.read_text(encoding="utf-8"))
    problems = []
    for match in _LINK.finditer(text):
        target = match.group(1) or match.group(2)
        why = broken_target(markdown, target)
        if why:
            problems.append(f"[..]({target}): {why}")
    assert not problems, f"{markdown.relative_to(ROOT)} has broken links:\n" + "\n".join(problems)


def test_docs_mentioned_in_code_exist():
    problems = []
    for source in project_files(".py", ".cfg", ".toml", ".yaml", "run"):
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            for mention in _DOCS_MENTION.findall(line):
                why = broken_target(ROOT / "README.md", mention)  # relative to the repository root
                if why:
                    problems.append(f"{source.relative_to(ROOT)}:{n}: {mention}: {why}")
    assert not problems, "code mentions docs that are not there:\n" + "\n".join(problems)


def test_nothing_cites_notes_outside_the_repository():
    me = Path(__file__).resolve()
    problems = []
    for source in project_files(".py", ".md", ".cfg", ".toml", ".yaml", ".txt", "run"):
        if source.resolve() == me:
            continue
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            cited = [name for name in _OUTSIDE_NOTES if name in line]
            if cited:
                problems.append(f"{source.relative_to(ROOT)}:{n}: cites {cited}")
    assert not problems, ("these cite notes that are not in the repository; write what the code "
                          "relies on under docs/ and point there:\n" + "\n".join(problems))


def test_config_reference_is_current():
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == config_doc.render(), (
        f"docs/config.md is not what trainer/rundir/config.py says; regenerate it with\n"
        f"    {config_doc.COMMAND}")


def test_every_config_key_is_described():
    for name, cls in config_doc._sections():
        config_doc.section(name, cls)  # raises naming the fields without a '#:' comment


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size} bytes, over {README_LIMIT_BYTES}: move detail into a page under docs/ "
        f"and link it")
