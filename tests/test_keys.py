"""The endpoint key can never be empty: racing first starts, bad keys refused, empty bearer refused."""

import os
import subprocess
from concurrent.futures import ProcessPoolExecutor

import pytest
from support import BIN, free_port, http


def _first_start(config_dir: str) -> str:
    os.environ["FINETUNE_PHI_CONFIG"] = config_dir
    os.environ.pop("FINETUNE_PHI_API_KEY", None)
    from finetune_phi.serving.keys import get_or_create_key

    return get_or_create_key()[0]


@pytest.mark.slow
def test_concurrent_first_starts_all_get_the_same_complete_key(tmp_path):
    # 150 creations racing in 30 folders: before the fix 45 of 150 read "" (file created, key not yet written)
    folders = [str(tmp_path / f"c{i}") for i in range(30)] * 5
    with ProcessPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(_first_start, folders))
    by_folder = {}
    for folder, key in zip(folders, keys, strict=True):
        by_folder.setdefault(folder, set()).add(key)
    assert all(len(k) == 1 for k in by_folder.values()), "two processes got different keys for one file"
    assert all(len(next(iter(k))) >= 16 for k in by_folder.values())
    for folder, (key,) in by_folder.items():
        assert (tmp_path / folder / "api_key").read_text().strip() == key
    assert not list(tmp_path.rglob(".api_key.*")), "a temp key file was left behind"


def _serve(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "finetune-phi"), "serve", "--deployment", "m=tiny", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    "key, problem",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("short", "at least 16"),
        ("has a space in it, long enough", "printable ASCII"),
    ],
)
@pytest.mark.slow
def test_server_refuses_to_start_on_a_bad_key_from_the_environment(key, problem):
    done = _serve({"FINETUNE_PHI_API_KEY": key})
    assert done.returncode != 0
    assert problem in done.stderr and "$FINETUNE_PHI_API_KEY" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_server_refuses_to_start_on_an_empty_key_file(tmp_path):
    (tmp_path / "api_key").write_text("")  # what a crash between create and write used to leave
    done = _serve({"FINETUNE_PHI_CONFIG": str(tmp_path)})
    assert done.returncode != 0 and "is empty" in done.stderr and f"delete {tmp_path / 'api_key'}" in done.stderr


@pytest.mark.slow
def test_empty_bearer_token_is_refused(endpoint):
    for header in ("Bearer", "Bearer ", "Bearer    ", "bearer\t"):
        assert http("POST", endpoint.url + "/score", {"input_data": ["hi"]}, {"Authorization": header})[0] == 401


def test_key_check_never_accepts_empty():
    from finetune_phi.serving.keys import matches

    assert not matches("", "")
    assert not matches(None, "")
    assert matches("x" * 20, "x" * 20)
