"""Nothing lost, nothing leaked (issue 13), training side: the output folder, its checkpoints, MLflow runs.

Real training of the cached tiny model for a few steps, a real MLflow store on SQLite, the real CLI.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
from support import BIN, run_cli, wait_for

from finetune_phi.errors import UserError
from finetune_phi.modeling import registry
from finetune_phi.training.trainer import TrainConfig, train


pytestmark = pytest.mark.slow  # every test here trains, serves or runs pf


@pytest.fixture(scope="module")
def data(sample_data, tmp_path_factory):
    """64 training and 16 test rows of the sample: an epoch is 4 steps, and evaluating one batch."""
    folder = tmp_path_factory.mktemp("data")
    for name, n in (("train.jsonl", 64), ("test.jsonl", 16)):
        rows = (sample_data / name).read_text().splitlines(keepends=True)
        (folder / name).write_text("".join(rows[:n]))
    return folder


def config(data, out, max_steps=4, **kwargs) -> TrainConfig:
    return TrainConfig(
        base_model="tiny",
        train_file=str(data / "train.jsonl"),
        eval_file=str(data / "test.jsonl"),
        out=str(out),
        save_steps=2,
        register=False,
        extra={"max_steps": max_steps},
        **kwargs,
    )


def cli_train(data, out, *flags, timeout=300):
    return subprocess.run(
        [
            str(BIN / "finetune-phi"),
            "train",
            "--base-model",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--save-steps",
            "2",
            "--no-register",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main_train(data, out, *flags, capsys) -> subprocess.CompletedProcess:
    """`finetune-phi train` in this process: as the command runs, without starting Python and torch again."""
    return run_cli(
        capsys,
        "train",
        "--base-model",
        "tiny",
        "--data",
        data,
        "--out",
        out,
        "--save-steps",
        "2",
        "--no-register",
        *flags,
    )


def one_line_error(done) -> str:
    """What a refused command showed: exit 2 and one error line, no traceback (progress bars aside)."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("finetune-phi train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def run_status(run_id: str) -> str:
    return registry.setup().MlflowClient().get_run(run_id).info.status


@pytest.fixture(scope="module")
def finished(data, tiny_model, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4); tests work on copies of its folder."""
    result = train(config(data, tmp_path_factory.mktemp("finished") / "ft"))
    assert run_status(result.run_id) == "FINISHED"
    return result


def copy_of(finished, tmp_path):
    return shutil.copytree(finished.out, tmp_path / "ft")


def test_a_finished_model_is_only_replaced_on_overwrite(finished, data, tmp_path):
    out = copy_of(finished, tmp_path)
    weights = (out / "model.safetensors").read_bytes()

    line = one_line_error(cli_train(data, out))
    assert line == (
        f"finetune-phi train: error: {out} already holds a trained model; "
        "use --resume to continue its run or --overwrite to replace it"
    )
    assert (out / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    replaced = train(config(data, out, max_steps=3, overwrite=True))
    assert replaced.run_id != finished.run_id
    assert json.loads((out / "finetune_phi.json").read_text())["steps"] == 3
    # only this run's checkpoints: the old checkpoint-4 would otherwise outlive them and be resumed from
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert run_status(finished.run_id) == "FINISHED"
    with open(out / ".lock") as lock:  # a run that ended released the folder
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_checkpoints_of_an_unfinished_run_are_only_replaced_on_overwrite(finished, data, tmp_path):
    out = copy_of(finished, tmp_path)
    for f in ("finetune_phi.json", "config.json", "model.safetensors"):
        (out / f).unlink()  # as a run killed before its end leaves the folder

    line = one_line_error(cli_train(data, out))
    assert f"{out} already holds checkpoints of an earlier run; use --resume" in line and "--overwrite" in line

    # --resume when no checkpoint loads any more does not quietly start over them either
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):
        os.truncate(ckpt / "scheduler.pt", 100)
    done = cli_train(data, out, "--resume")
    assert one_line_error(done) == (
        f"finetune-phi train: error: --resume: nothing in {out / 'checkpoints'} to resume "
        f"from, and {out} holds checkpoints of an earlier run; use --overwrite to replace it"
    )
    assert done.stdout.count("scheduler.pt does not load") == 2


def test_a_second_run_on_the_same_out_stops_at_once_and_a_crash_frees_the_folder(data, tiny_model, tmp_path):
    out = tmp_path / "ft"
    first = subprocess.Popen(
        [
            str(BIN / "finetune-phi"),
            "train",
            "--base-model",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "100",
            "--no-register",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid),
            "the first run to take the folder",
            120,
            proc=first,
        )

        # at once, before any model or data is loaded: a base model and data that do not exist are not
        # noticed; and without waiting for the lock (the first run, 100 epochs, is still going after)
        second = cli_train(
            tmp_path / "no-such-data", out, "--overwrite", "--base-model", str(tmp_path / "no-such-model")
        )
        assert (
            one_line_error(second)
            == f"finetune-phi train: error: {out} is in use by another training run (PID {first.pid})"
        )
        assert first.poll() is None  # and the first run goes on
    finally:
        first.kill()  # a crash: no clean-up code runs
        first.wait()

    with open(out / ".lock") as lock:  # the kernel released the dead run's lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("damaged", ["optimizer.pt", "model.safetensors"])
def test_resume_skips_a_damaged_checkpoint_and_leaves_the_finished_run_alone(
    finished, data, tmp_path, capsys, damaged
):
    out = copy_of(finished, tmp_path)
    newest, previous = out / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-2"
    f = newest / damaged
    os.truncate(f, f.stat().st_size // 2)  # as a full disk or a kill mid-save leaves it

    resumed = train(config(data, out, max_steps=6, resume=True))
    said = capsys.readouterr().out
    assert f"--resume: skipping incomplete checkpoint {newest}: {damaged} does not load" in said
    assert f"--resume: resuming from {previous} (step 2)" in said
    assert resumed.steps == 6
    # continuing a finished model is a new MLflow run; the finished one is not reopened or altered
    assert resumed.run_id != finished.run_id and run_status(finished.run_id) == "FINISHED"
    new_run = registry.setup().MlflowClient().get_run(resumed.run_id)
    assert new_run.data.tags["finetune_phi.resumed_from_run"] == finished.run_id
    assert resumed.base_eval_loss == new_run.data.metrics["base_eval_loss"] == pytest.approx(finished.base_eval_loss)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_finished_run_stays_finished(
    finished, data, small_disk, capsys
):
    out = shutil.copytree(finished.out, small_disk / "ft")  # ~25 MB of the 40
    weights = (out / "model.safetensors").read_bytes()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 2 * 2**20))  # leave 2 MB: less than one checkpoint

    done = main_train(data, out, "--resume", "--epochs", "1.5", capsys=capsys)  # 6 steps: it saves checkpoint-6
    line = one_line_error(done)
    assert line.startswith(
        f"finetune-phi train: error: could not write checkpoint to {out / 'checkpoints' / 'checkpoint-6'}: "
    )
    assert line.endswith("; free disk space or choose another --out")
    assert "resuming from" in done.stdout
    assert run_status(finished.run_id) == "FINISHED"  # the crash is the new run's, not the finished one's
    assert run_status((out / "checkpoints" / "mlflow_run_id").read_text().strip()) == "FAILED"
    assert (out / "model.safetensors").read_bytes() == weights


def test_an_out_that_is_a_file_is_one_line(data, tmp_path):
    out = tmp_path / "model.txt"
    out.write_text("notes")
    assert one_line_error(cli_train(data, out)) == (
        f"finetune-phi train: error: --out {out} is a file; give a folder for the model"
    )
    assert out.read_text() == "notes"


def test_a_read_only_out_is_one_line(data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    # we run as root, whom chmod does not stop; a read-only mount stops everyone
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        for out in (ro, ro / "ft"):  # the folder itself, or a new one inside it
            assert one_line_error(cli_train(data, out)) == (
                f"finetune-phi train: error: cannot write to --out {out}: Read-only file system; "
                "choose a folder you can write to"
            )
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)


def test_user_errors_are_one_line_and_library_errors_keep_their_traceback(finished, data, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    done = run_cli(capsys, "train", "--data", data, "--out", out)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("use --resume to continue its run or --overwrite to replace it")
    with pytest.raises(UserError):
        train(config(data, out, resume=True, overwrite=True))

    # a ValueError from inside transformers is no user message of ours: main lets it show its traceback
    with pytest.raises(ValueError, match="Unknown `fsdp` option: bogus"):
        run_cli(capsys, "train", "--data", data, "--out", tmp_path / "new", "--fsdp", "bogus", "--no-register")


REGISTER_AND_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from finetune_phi.modeling import registry
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
if sys.argv[2] == "changed":  # another fine-tune: other weights
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(sys.argv[3])
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[3])
registry.log_model(sys.argv[3] if sys.argv[2] == "changed" else sys.argv[1])
folder = registry.download_model("models:/finetune-phi/1")
print("FOLDER", folder, float(next(AutoModelForCausalLM.from_pretrained(folder).parameters()).sum()))
"""


@pytest.mark.slow
def test_a_registry_made_again_never_serves_the_old_version_1_from_the_cache(tiny_model, tmp_path):
    """Run the demo, delete its mlflow.db, run it again: the new version 1 is another model, and it is the
    one loaded (the download cache is keyed by what the version is, not only its number)."""
    import shutil

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store}

    def register(kind: str) -> tuple[str, float]:
        done = subprocess.run(
            [sys.executable, "-c", REGISTER_AND_LOAD, str(tiny_model), kind, str(tmp_path / "other")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        _, folder, total = next(line for line in done.stdout.splitlines() if line.startswith("FOLDER")).split()
        return folder, float(total)

    first = register("same")
    (tmp_path / "mlflow.db").unlink()
    shutil.rmtree(tmp_path / "mlruns")
    second = register("changed")
    assert second[0] != first[0] and second[1] != pytest.approx(first[1])
