"""bench/ultrachat.py's smoke version (the suite's two-minute check of the real-data result): real
UltraChat rows from ../shared/assets, the real smollm2-135m LoRA-fine-tuned for a step, served,
compared greedy through the real flows twice — the two tables are identical to the last digit."""

import json
import subprocess
import sys

import pytest
from support import REPO, SHARED_ASSETS


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SHARED_ASSETS / "ultrachat-sample" / "ultrachat1000-messages.jsonl").exists(),
        reason="no ../shared/assets/ultrachat-sample (real UltraChat rows)",
    ),
]


def test_the_real_ultrachat_bench_runs_and_its_greedy_comparison_repeats_exactly(smollm2_model, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ultrachat.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["lines"] == {"total": 6, "paired": 6, "failed": {"base": 0, "ft": 0}}
    assert figures["repeat_identical"] and "the same comparison twice: identical tables" in done.stdout
    assert figures["steps"] == 1 and 0 < figures["loss"]["candidate"] < 10
    assert done.stdout.count("\n  Q:   ") == 5  # five answer pairs side by side
