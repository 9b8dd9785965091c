"""Every Python package in the source folders is listed in setup.cfg, so the wheel has it.

setuptools installs only the packages ``setup.cfg`` names; an unlisted subpackage works
in the source tree and in a (lenient) editable install, and is silently missing from the
wheel, where the first import of it fails.
"""
import configparser
import os
import subprocess
import sys
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


def test_the_built_package_has_the_protocol_and_generates_the_config_reference(tmp_path):
    # What a (non-editable) wheel installs: setuptools' build_py lays out the packages
    # setup.cfg names, as `pip install .` puts them in site-packages.
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                    "build_py", "--build-lib", str(lib)], cwd=ROOT, check=True, timeout=120,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(lib)}
    where = subprocess.run(
        [sys.executable, "-c", "import paddlerun.launcher.cli, paddlerun.trainer.rundir as r; "
                               "print(r.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(lib / "paddlerun" / "trainer" / "rundir" / "__init__.py")
    doc = subprocess.run([sys.executable, "-m", "paddlerun.trainer.rundir.config_doc"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert doc.returncode == 0, doc.stderr
    assert doc.stdout == (ROOT / "docs" / "config.md").read_text()
