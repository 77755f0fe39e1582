"""A non-editable `pip install .`: the wheel carries every sub-package, and the installed package finds the
project's flows from the current folder or --project, or says how to point at them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from support import REPO


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package as `pip install .` lays it out (the wheel unpacked, without its dependencies): no source checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("finetune_phi-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def run(site, code, cwd, *args):
    """python -P (no current folder on sys.path: from the checkout it would import the source, not the install)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("FINETUNE_PHI_PROJECT", None)
    return subprocess.run(
        [sys.executable, "-P", "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_wheel_holds_every_module_of_the_source(installed):
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "finetune_phi").rglob("*.py")}
    packed = {p.relative_to(installed).as_posix() for p in (installed / "finetune_phi").rglob("*.py")}
    assert source == packed, sorted(source ^ packed)


def test_flows_are_found_from_the_project_folder_and_with_project(installed, tmp_path):
    code = (
        "import finetune_phi, sys; from finetune_phi import project\n"
        "assert 'site' in finetune_phi.__file__, finetune_phi.__file__  # the installed copy, not the checkout\n"
        "project.use(sys.argv[1] if len(sys.argv) > 1 else None); print(project.flow('chat'))"
    )
    done = run(installed, code, REPO)
    assert done.returncode == 0 and done.stdout.strip() == str(REPO / "flows" / "chat"), done.stderr
    done = run(installed, code, tmp_path, str(REPO))
    assert done.returncode == 0 and done.stdout.strip() == str(REPO / "flows" / "chat"), done.stderr

    done = run(installed, code, tmp_path)  # elsewhere, nothing said: a clear error, not a path into site-packages
    assert done.returncode != 0 and "ProjectNotFound" in done.stderr and "--project PATH" in done.stderr, done.stderr
    done = run(installed, code, REPO, str(tmp_path))
    assert done.returncode != 0 and f"--project {tmp_path}: not a finetune-phi project" in done.stderr, done.stderr
