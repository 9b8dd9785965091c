"""Every Python package in the source folders is listed in setup.cfg, so the wheel has it.

setuptools installs only the packages ``setup.cfg`` names; an unlisted subpackage works
in the source tree and in a (lenient) editable install, and is silently missing from the
wheel, where the first import of it fails.
"""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_wheel():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    mapping = dict(line.split(" = ") for line in setup["options"]["package_dir"].strip().splitlines())
    present = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            present.add(".".join((package, *relative)))
    missing = sorted(present - listed)
    assert not missing, (f"setup.cfg [options] packages lacks {missing}: add them, or the wheel "
                         f"ships without them")
