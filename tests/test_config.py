"""One source of truth for train's settings: the dataclasses in finetune_phi/training/config.py make the flags
and the --config keys, and the torchrun relaunch and the Azure ML job's command line are written from
the parsed object and parse back into an equal one. No training, no model loading."""

import importlib.util
import shlex
import subprocess
from dataclasses import fields, replace

import pytest
from azure.ai.ml import load_job
from support import REPO

from finetune_phi import cli
from finetune_phi.azureml import entities
from finetune_phi.errors import UserError
from finetune_phi.training.config import TrainArguments, TrainConfig


# a value other than the default for every setting of a training run (str values with spaces and
# dashes, to test the quoting); test_every_setting_has_a_test_value keeps this complete
NON_DEFAULT = {
    "base_model": "microsoft/Phi-3-mini-4k-instruct",
    "tokenizer": "tokenizers/phi 3",
    "data": None,  # a folder: below
    "train_file": None,
    "eval_file": None,
    "out": "models/other run",
    "lora": True,
    "lora_r": 8,
    "lora_alpha": 64,
    "lora_dropout": 0.1,
    "qlora": True,
    "loss_on": "all",
    "epochs": 2.5,
    "lr": 2e-4,
    "batch_size": 8,
    "grad_accum": 4,
    "max_length": 1024,
    "warmup": 50.0,
    "weight_decay": 0.01,
    "packing": True,
    "activation_checkpointing": False,
    "fsdp": "full_shard auto_wrap",
    "deepspeed": "ds/zero 3.json",
    "save_steps": 10,
    "save_total_limit": 5,
    "logging_steps": 1,
    "seed": -7,
    "resume": True,
    "overwrite": True,
    "register": False,
    "registered_model": "phi-chat",
    "skip_memory_check": True,
}
# each field alone, the other value of the three-valued one, and all of them together
CASES = [{name: None} for name in NON_DEFAULT] + [{"activation_checkpointing": True}, dict.fromkeys(NON_DEFAULT)]


def case_id(case):
    return "all" if len(case) > 1 else "{}={}".format(*next(iter(case.items())))


@pytest.fixture
def data_folders(tmp_path):
    """Two data folders (the default `data` one and another), each with train.jsonl and test.jsonl."""
    for folder in ("data", "other data"):
        (tmp_path / folder).mkdir()
        for name in ("train.jsonl", "test.jsonl"):
            (tmp_path / folder / name).write_text("{}\n")
    (tmp_path / "mine.jsonl").write_text("{}\n")
    (tmp_path / "held out.jsonl").write_text("{}\n")
    return tmp_path


def config_for(case, folders) -> TrainConfig:
    """The local config of a case: the named settings at their test values, the rest at their defaults
    (data in a temporary folder, so the job's inputs exist)."""
    values = {
        "data": str(folders / "other data"),
        "train_file": str(folders / "mine.jsonl"),
        "eval_file": str(folders / "held out.jsonl"),
    }
    settings = {name: values.get(name, NON_DEFAULT[name]) if value is None else value for name, value in case.items()}
    return TrainConfig(**{"data": str(folders / "data"), **settings})


def parsed(argv) -> TrainConfig:
    return cli.parse_args(argv).train


def test_every_setting_has_a_test_value():
    assert set(NON_DEFAULT) == {f.name for f in fields(TrainArguments)}
    for name, value in NON_DEFAULT.items():
        assert value is None or value != getattr(TrainConfig(), name), name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flags_written_by_to_args_parse_back_into_the_same_config(case, data_folders):
    cfg = config_for(case, data_folders)
    assert parsed(["train", *cfg.to_args()]) == cfg


def job_argv(command: str, cfg: TrainConfig, job) -> list[str]:
    """The job's command with its inputs and output bound as Azure binds them, less `python SCRIPT`."""
    bound = (
        command.replace("${{inputs.train_file}}", shlex.quote(job.inputs["train_file"].path))
        .replace("${{inputs.eval_file}}", shlex.quote(job.inputs["eval_file"].path))
        .replace("${{outputs.model}}", shlex.quote(cfg.out))
    )
    python, script, *argv = shlex.split(bound)
    assert (python, script) == ("python", "training/fine_tune.py")
    return argv


def fine_tune_to_train_argv(argv, monkeypatch) -> list[str]:
    """What training/fine_tune.py (the job's entry) hands to `finetune-phi train` for these arguments."""
    spec = importlib.util.spec_from_file_location("fine_tune", REPO / "training" / "fine_tune.py")
    fine_tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fine_tune)
    seen = []
    monkeypatch.setattr(cli, "main", lambda train_argv: seen.append(train_argv) or 0)
    assert fine_tune.main(argv) == 0
    return seen[0]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_azure_jobs_command_line_parses_back_into_the_local_config(case, data_folders, monkeypatch):
    cfg = config_for(case, data_folders)
    job = entities.training_job(cfg, "cluster", entities.training_environment(), nodes=2, gpus_per_node=4)
    train_argv = fine_tune_to_train_argv(job_argv(job.command, cfg, job), monkeypatch)
    # the job runs exactly this run, its --data folder spelled out as the two files it uploads
    assert parsed(train_argv) == cfg.with_data_files()
    local = cfg.resolved()
    assert (job.inputs["train_file"].path, job.inputs["eval_file"].path) == (local.train_file, local.eval_file)


def test_the_dry_runs_job_yaml_carries_every_setting(data_folders, tmp_path, monkeypatch):
    """Through the CLI, as a user runs it: --dry-run's job.yml, read back by azure-ai-ml's loader."""
    local_only = ("tokenizer", "resume", "overwrite")  # refused with --target azure (a local folder, a local run)
    cfg = config_for({name: None for name in NON_DEFAULT if name not in local_only}, data_folders)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--target", "azure", "--dry-run", "--dry-run-dir", "dry", *cfg.to_args()]) == 0
    job = load_job(tmp_path / "dry" / "job.yml")
    train_argv = fine_tune_to_train_argv(job_argv(job.command, cfg, job), monkeypatch)
    assert parsed(train_argv) == cfg.with_data_files()


@pytest.mark.parametrize("case", [{"lora": None}, dict.fromkeys(NON_DEFAULT)], ids=case_id)
def test_the_torchrun_relaunch_parses_back_into_the_local_config(case, data_folders, tmp_path, monkeypatch):
    cfg = config_for(case, data_folders)
    config = tmp_path / "train.yaml"
    config.write_text(
        "".join(
            f"{name}: {value!r}\n" if isinstance(value, str) else f"{name}: {str(value).lower()}\n"
            for name, value in cfg.__dict__.items()
            if name != "extra" and value is not None
        )
    )
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for argv in (["train", "--nproc", "3", *cfg.to_args()], ["train", "--nproc", "3", "--config", str(config)]):
        launched.clear()
        assert cli.main(argv) == 0
        cmd = launched[0]
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m"]
        assert parsed(cmd[cmd.index("finetune_phi.cli") + 1 :]) == cfg


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_yaml_file_sets_every_setting_and_flags_override_it(tmp_path):
    yaml = [
        f"{name}: {value!r}" if isinstance(value, str) else f"{name}: {str(value).lower()}"
        for name, value in NON_DEFAULT.items()
        if value is not None
    ]
    yaml += [
        "data: other",
        "train_file: t.jsonl",
        "eval-file: e.jsonl",  # a dashed key works too
        "target: azure",
        "nproc: 2",
        "compute: big",
        "compute_size: cpu",
        "nodes: 3",
        "gpus_per_node: 2",
        "image: my/image:1",
        "experiment: exp",
        "stream: false",
        "dry_run: true",
        "dry_run_dir: out/dry",
        "workspace: ws",
        "lr: 3e-4",
    ]  # YAML 1.1 reads 3e-4 as a string: still a number here
    args = cli.parse_args(["train", "--config", write(tmp_path / "train.yaml", "\n".join(yaml))])
    expected = replace(
        TrainConfig(**{k: v for k, v in NON_DEFAULT.items() if v is not None}),
        data="other",
        train_file="t.jsonl",
        eval_file="e.jsonl",
        lr=3e-4,
    )
    assert args.train == expected
    assert (args.launch.target, args.launch.nproc) == ("azure", 2)
    assert (
        args.job.compute,
        args.job.compute_size,
        args.job.nodes,
        args.job.gpus_per_node,
        args.job.image,
        args.job.experiment,
        args.job.stream,
        args.job.dry_run,
        args.job.dry_run_dir,
    ) == ("big", "cpu", 3, 2, "my/image:1", "exp", False, True, "out/dry")
    assert args.workspace == "ws"

    flags = cli.parse_args(
        [
            "train",
            "--config",
            str(tmp_path / "train.yaml"),
            "--lr",
            "1e-5",
            "--lora",
            "false",
            "--register",
            "--activation-checkpointing",
            "--target",
            "local",
            "--stream",
        ]
    )
    assert (flags.train.lr, flags.train.lora, flags.train.register, flags.train.activation_checkpointing) == (
        1e-5,
        False,
        True,
        True,
    )
    assert flags.launch.target == "local" and flags.job.stream is True
    assert flags.train.epochs == 2.5  # the rest still from the file


def run_main(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora: true\nlearning_rate: 1e-4\n", "unknown key 'learning_rate'"),
        ("lroa: true\n", "unknown key 'lroa' (did you mean 'lora'?)"),
        ("extra: {max_steps: 3}\n", "unknown key 'extra'"),
        ("epochs: three\n", "epochs: expected a number, got 'three'"),
        ("batch_size: 2.5\n", "batch_size: expected an integer, got 2.5"),
        ("lora: maybe\n", "lora: expected true or false, got 'maybe'"),
        ("loss_on: everything\n", "loss_on: expected one of assistant, all, got 'everything'"),
        ("target: aws\n", "target: expected one of local, azure, got 'aws'"),
        ("base_model: [tiny]\n", "base_model: expected a string, got ['tiny']"),
        ("save_steps: null\n", "save_steps: needs a value, not null"),
        ("- lora\n", "expected a mapping of setting: value, got a YAML list"),
        ("lora: [\n", "not valid YAML (line"),
    ],
)
def test_a_mistake_in_the_yaml_file_is_one_line_naming_file_and_key(text, message, tmp_path, capsys):
    path = write(tmp_path / "train.yaml", text)
    rc, err = run_main(["train", "--config", path], capsys)
    assert rc == 2 and err.startswith(f"finetune-phi train: error: {path}: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_config_file_is_named(tmp_path, capsys):
    rc, err = run_main(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and err.startswith(f"finetune-phi train: error: --config {tmp_path / 'nope.yaml'}: No such file")


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path):
    path = write(tmp_path / "train.yaml", "lroa: true\n")
    for argv in (["--debug", "train", "--config", path], ["train", "--config", path, "--debug"]):
        with pytest.raises(UserError, match="unknown key 'lroa'"):
            cli.main(argv)


def test_anything_but_a_user_error_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise ValueError("a bug of ours, or a library's")

    monkeypatch.setattr(cli, "cmd_data", bug)
    with pytest.raises(ValueError, match="a bug of ours"):
        cli.main(["data"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--deployment", "nonsense"], "--deployment 'nonsense': expected NAME=VALUE"),
        (["serve", "--deployment", "a=tiny", "--traffic", "b=100"], "--traffic names no deployment"),
        (["connect", "--api-key-env", "FINETUNE_PHI_TEST_UNSET"], "the environment variable is not set"),
    ],
)
def test_bad_flags_of_other_commands_are_one_line(argv, message, capsys):
    rc, err = run_main(argv, capsys)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_every_flag_spelling_users_typed_before_still_parses():
    old = [
        "--base-model",
        "m",
        "--tokenizer",
        "t",
        "--data",
        "d",
        "--train-file",
        "a",
        "--eval-file",
        "b",
        "--out",
        "o",
        "--lora",
        "--loss-on",
        "all",
        "--epochs",
        "2",
        "--lr",
        "0.1",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--save-steps",
        "3",
        "--save-total-limit",
        "4",
        "--packing",
        "--activation-checkpointing",
        "--qlora",
        "--skip-memory-check",
        "--nproc",
        "1",
        "--fsdp",
        "full_shard",
        "--deepspeed",
        "z.json",
        "--seed",
        "5",
        "--resume",
        "--overwrite",
        "--no-register",
        "--target",
        "azure",
        "--subscription-id",
        "s",
        "--resource-group",
        "r",
        "--workspace",
        "w",
        "--location",
        "l",
        "--compute",
        "c",
        "--compute-size",
        "cpu",
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--image",
        "i",
        "--experiment",
        "e",
        "--no-stream",
        "--dry-run",
        "--dry-run-dir",
        "x",
    ]
    args = cli.parse_args(["train", *old])
    assert (
        args.train.base_model,
        args.train.max_length,
        args.train.register,
        args.train.activation_checkpointing,
        args.job.stream,
        args.job.dry_run,
        args.resource_group,
    ) == ("m", 64, False, True, False, True, "r")
    assert cli.parse_args(["train", "--no-activation-checkpointing"]).train.activation_checkpointing is False
    new = cli.parse_args(
        [
            "train",
            "--grad-accum",
            "8",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0",
            "--warmup",
            "10",
            "--weight-decay",
            "0.1",
            "--registered-model",
            "x",
            "--logging-steps",
            "2",
        ]
    )
    assert (
        new.train.grad_accum,
        new.train.lora_r,
        new.train.lora_alpha,
        new.train.lora_dropout,
        new.train.warmup,
        new.train.weight_decay,
        new.train.registered_model,
        new.train.logging_steps,
    ) == (8, 4, 8, 0.0, 10.0, 0.1, "x", 2)


def test_defaults_resolve_as_before():
    cfg = parsed(["train"]).resolved()
    assert (cfg.base_model, cfg.train_file, cfg.eval_file, cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_length) == (
        "tiny",
        "data/train.jsonl",
        "data/test.jsonl",
        6,
        3e-3,
        16,
        256,
    )
    real = TrainConfig(base_model="microsoft/Phi-3-mini-4k-instruct", qlora=True).resolved()
    assert (real.lora, real.lr, real.batch_size, real.max_length, real.epochs) == (True, 2e-4, 4, 2048, 1)


def test_sft_overrides_have_no_flag_and_are_not_dropped_silently():
    with pytest.raises(ValueError, match="no flag"):
        TrainConfig(extra={"max_steps": 3}).to_args()


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_read_by_train_as_a_config_file(recipe):
    """recipes/*.yaml through the real command line: every key is a setting of the right type (a typo would be a
    one-line error), and what the file says is what the run gets."""
    import yaml

    args = cli.parse_args(["train", "--config", str(recipe)])
    for key, value in yaml.safe_load(recipe.read_text()).items():
        got = getattr(args.train, key) if hasattr(args.train, key) else getattr(args.job, key)
        assert got == value, (key, got, value)


def test_the_demo_trains_with_its_recipe_file():
    from finetune_phi import demo

    settings = demo.train_settings(demo.RECIPES["real"])
    assert settings == {"lora": True, "lr": 5e-4, "batch_size": 8, "max_length": 256, "epochs": 1}
