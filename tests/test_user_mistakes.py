"""Mistakes a user makes at the command line end in one line that says what is wrong, exit code 2,
no traceback, and nothing started: each replayed through the real CLI (in-process, support.run_cli)."""

import pytest
from support import run_cli


@pytest.mark.parametrize(
    "args, says",
    [
        (["serve", "--port", "99999"], "99999 is out of range: give 1 to 65535"),
        (["serve", "--max-concurrent-requests", "0"], "0 is too small: give at least 1"),
        (["serve", "--max-body-bytes", "-1"], "-1 is too small"),
        (["serve", "--max-new-tokens-cap", "ten"], "'ten' is not a whole number"),
        (["compare", "--base", "b", "--candidate", "c", "--workers", "0"], "0 is too small"),
        (["compare", "--base", "b", "--candidate", "c", "--max-tokens", "0"], "0 is too small"),
        (["compare", "--base", "b", "--candidate", "c", "--max-failed", "lots"], "--max-failed takes a share"),
        (["compare", "--base", "b", "--candidate", "c", "--temperature", "3"], "--temperature must be from 0"),
        (["compare", "--base", "b", "--candidate", "c", "--name", "n" * 300], "use at most 100 letters"),
        (["compare", "--candidate", "c"], "compare needs --base and --candidate"),
        (["compare", "--base", "b", "--candidate", "c", "--azure-ai-project", "sub/rg/proj"], "add --runner maf"),
        (
            ["compare", "--base", "b", "--candidate", "c", "--runner", "maf", "--azure-ai-project", "sub/rg"],
            "give the project's endpoint",
        ),
        (["compare", "--resume", "never_ran"], "nothing to resume"),
        (["train", "--base-model", "tiny", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["train", "--base-model", "tiny", "--max-length", "1"], "--max-length 1: must be at least 16"),
        (["train", "--base-model", "tiny", "--epochs", "0"], "--epochs 0.0: must be above 0"),
        (["train", "--base-model", "tiny", "--epochs", "-1"], "--epochs -1.0: must be above 0"),
        (["tiny", "--tokenizer", "/nonexistent"], "--tokenizer /nonexistent: no tokenizer.json there"),
        # the suite is offline (HF_HUB_OFFLINE=1) with nothing cached: the hub dataset cannot come
        (["data", "--source", "ultrachat", "--out", "d"], "cannot load HuggingFaceH4/ultrachat_200k (split train_sft"),
    ],
)
def test_a_mistake_is_one_line(capsys, tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    done = run_cli(capsys, *args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_eval_file_and_a_bad_endpoint_url_are_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "empty.jsonl").write_text("")
    done = run_cli(
        capsys,
        "compare",
        "--base",
        "b",
        "--candidate",
        "c",
        "--data",
        tmp_path / "empty.jsonl",
        "--reports",
        tmp_path / "reports",
    )
    assert done.returncode == 2 and "has no rows to compare on" in done.stderr and "Traceback" not in done.stderr
    monkeypatch.setenv("SOME_KEY", "k" * 32)
    done = run_cli(capsys, "connect", "--endpoint-url", "ftp://x", "--api-key-env", "SOME_KEY")
    assert (
        done.returncode == 2
        and "must start with http:// or https://" in done.stderr
        and "Traceback" not in done.stderr
    )


def test_registry_mistakes_are_one_line(tmp_path, monkeypatch):
    from finetune_phi.errors import UserError
    from finetune_phi.modeling import registry

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow exports the registry's in-process
        monkeypatch.setenv(var, f"sqlite:///{tmp_path / 'mlflow.db'}")
    for uri, says in (
        ("models:/finetune-phi/99", "not in the registry"),
        ("models:/finetune-phi@champion", "not in the registry"),
    ):
        with pytest.raises(UserError, match=says):
            registry.download_model(uri)
    (tmp_path / "broken.db").write_bytes(b"this is not a database" * 100)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, f"sqlite:///{tmp_path / 'broken.db'}")
    with pytest.raises(UserError, match="cannot be used"):
        registry.setup()


def test_a_registered_version_whose_files_were_deleted_is_one_line(tiny_model, tmp_path, monkeypatch):
    import shutil

    from finetune_phi.errors import UserError
    from finetune_phi.modeling import registry

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FINETUNE_PHI_CACHE", str(tmp_path / "cache"))  # no cached copy to fall back on
    registry.log_model(tiny_model)
    artifacts = list(tmp_path.rglob("MLmodel"))
    assert artifacts, "log_model wrote no model files under the working folder"
    for mlmodel in artifacts:
        shutil.rmtree(mlmodel.parent)
    with pytest.raises(UserError, match="registered, but its files cannot be read"):
        registry.download_model("models:/finetune-phi/1")
