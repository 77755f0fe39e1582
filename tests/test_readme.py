"""The README's two commands, from a fresh copy of the repository (what a clone contains)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


def test_readme_names_the_two_make_targets():
    assert readme_commands() == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.xdist_group("tiny-fine-tune")
def test_make_test_runs_the_tests_around_one_trained_model_on_one_worker(request):
    """`make test`'s two workers: conftest groups the tests that share the tiny fine-tune, so it is trained once."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under pytest-xdist's --dist loadgroup (make test)")
    assert request.node.nodeid.endswith("@tiny-fine-tune"), (
        "pytest-xdist ignored the group (pytest-xdist#1386: pytest 9.2 with pytest-xdist 3.8); see pyproject.toml's pin"
    )


@pytest.mark.slow
def test_make_demo_runs_the_whole_loop_from_a_fresh_copy(tmp_path):
    clone = fresh_copy(tmp_path / "clone")
    venv = Path(sys.prefix)
    # reuse this environment instead of installing a second one: `-o` tells make it is up to date
    # the demo's own default MLflow store, and a Prompt flow home of its own: the demo points the
    # connection finetune_phi_endpoint at its endpoint, which must not touch the session's. That home
    # is new and unconfigured, as a user's is: the clone's pf.yaml keeps pf offline.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "PF_HOME_DIRECTORY": str(tmp_path / "pf")
    }
    # the tiny model keeps the suite within its 15 minutes; the real-model demo (5-6 min on 2 cores)
    # is the same code, and smollm2-135m itself is covered by test_real_model.py
    done = subprocess.run(
        ["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed", "DEMO_ARGS=--base-model tiny"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    for step in range(1, 9):
        assert f"[{step}/8]" in out
    base = float(re.search(r"base\s+([\d.]+)\n", out).group(1))
    tuned = float(re.search(r"fine-tuned\s+([\d.]+)", out).group(1))
    assert tuned < 0.25 * base
    assert re.search(r"ft: 'The capital of", out)  # the fine-tuned deployment answered through the chat flow
    assert "pf flow serve --source" in out and (clone / "demo" / "mlflow.db").exists()
