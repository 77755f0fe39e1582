"""`finetune-phi`: one command with a subcommand per stage of the loop.

The package's modules import heavy libraries (torch, transformers, trl, mlflow, promptflow) only where they are
used, so `--help` answers at once; transformers' HfArgumentParser is imported only for a command whose settings
are dataclasses (OPTIONS).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from dataclasses import replace

from . import project
from .azureml import ops
from .azureml.ops import endpoint_url_and_key
from .azureml.options import DEPLOY_COMMAND, ENDPOINT_NAME
from .azureml.settings import SETTINGS, AzureSettings
from .data.prepare import prepare
from .demo import run_demo
from .errors import UserError
from .evaluation.compare import COMPARE_COMMAND, compare
from .modeling.export import add_export_parser
from .modeling.models import DEFAULT_HUB_MODEL, SMOLLM2, tiny_path
from .options import (
    add_negations,
    bound_flags,
    from_namespace,
    load_yaml_defaults,
    whole_number,
)
from .serving.app import serve
from .serving.client import EndpointError
from .serving.connection import CONNECTION_NAME, connect, resolve_key
from .serving.options import PORT, SCORING_URI, SERVE_COMMAND
from .training.config import TRAIN_COMMAND, TrainConfig
from .training.trainer import train


def _offline_env():
    # Respect the user's settings; without a hub these keep transformers/datasets from resolving hosts.
    if os.environ.get("FINETUNE_PHI_OFFLINE", "") == "1":
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    # Prompt flow's Azure Monitor exporter asks settings.sdk.monitor.azure.com (and retries in vain
    # offline) unless told not to; every command that runs pf in-process (compare, connect, demo) inherits this
    for var in ("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"):
        os.environ.setdefault(var, "true")


COMMANDS = ("data", "tiny", "train", "serve", "connect", "deploy", "delete", "compare", "demo", "export")
MODEL_COMMANDS = ("train", "serve", "demo", "compare", "tiny")
# commands whose settings are dataclasses (finetune_phi.options): flags, --config YAML and defaults from one field each
OPTIONS = {"train": TRAIN_COMMAND, "serve": SERVE_COMMAND, "deploy": DEPLOY_COMMAND, "compare": COMPARE_COMMAND}


def _quiet_libraries():
    """Commands that load models show their own progress (one bar for training, a line per stage):
    transformers' per-file bars (loading weights, writing shards, converting GGUF) and a deprecation
    warning raised inside peft/TRL on every run would only bury it. MLflow's INFO lines (creating its
    tables) and its warnings about a local model having no hub model card or license say nothing to act on."""

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # MLflow sets its loggers' level when it is imported (later, inside the command): its own switch says it
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def cmd_data(args):
    result = prepare(
        args.source,
        args.out,
        split=args.split,
        test_split=args.test_split,
        test_size=args.test_size,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        sample_size=args.sample_size,
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} invalid rows, first: {result.skipped[0]}", file=sys.stderr)
    if result.duplicates:
        print(f"dropped {result.duplicates} rows whose prompt_id repeats an earlier row's", file=sys.stderr)
    read = ", ".join(f"{n} rows in {form} form" for form, n in result.formats.items())
    print(
        f"read {read}; wrote {result.out}/train.jsonl ({result.train} rows), test.jsonl ({result.test}), "
        f"eval.jsonl ({result.eval})"
    )


def cmd_tiny(args):
    print(tiny_path(args.tokenizer))


def _relaunch_with_torchrun(cfg, nproc: int, debug: bool) -> int:
    """`train --nproc N`: the same run under torchrun, N data-parallel processes (gloo on CPU, NCCL on GPU).

    The command line is written from the parsed config, so a --config file's settings travel too."""

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "finetune_phi.cli",
        *(["--debug"] if debug else []),
        "train",
        *cfg.to_args(),
    ]
    print("running: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _azure_settings(args):
    return AzureSettings.load(
        subscription_id=args.subscription_id,
        resource_group=args.resource_group,
        workspace=args.workspace,
        location=args.location,
        identity=getattr(args, "identity", None),
    )


def cmd_train(args):
    cfg, launch, job = args.train, args.launch, args.job
    if launch.target == "azure":
        if cfg.tokenizer or cfg.resume or cfg.overwrite:
            raise UserError(
                "--tokenizer, --resume and --overwrite are local options; an Azure job starts from "
                "--base-model and writes a new output"
            )
        # Azure's GPUs get the tutorial's Phi-3 (a laptop the quick tiny model: TrainConfig.resolved)
        ops.train(_azure_settings(args), replace(cfg, base_model=cfg.base_model or DEFAULT_HUB_MODEL), job)
        return 0
    if job.dry_run:
        raise UserError("--dry-run applies to --target azure")
    if launch.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(cfg, launch.nproc, args.debug)

    r = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0  # another rank of a multi-process run: rank 0 reports
    base = f"{r.base_eval_loss:.4f}" if r.base_eval_loss is not None else "unknown"  # a resume can lack it
    print(
        f"\nheld-out loss: base {base} -> fine-tuned {r.eval_loss:.4f} "
        f"(perplexity {r.perplexity:.2f}); {r.steps} steps in {r.seconds:.0f} s"
    )
    print(f"model folder: {r.out}")
    if r.registered_version:
        print(f"registered:   models:/{cfg.registered_model}/{r.registered_version} (MLflow run {r.run_id})")
    return 0


def cmd_serve(args):
    options, limits = args.options
    serve(
        options.deployments(),
        options.traffic_split(),
        options.host,
        options.port,
        limits,
        engine=options.engine,
        engine_options=options.engine_options(),
    )


def cmd_connect(args):
    if args.target == "azure":
        if not args.endpoint_name:
            raise UserError("--target azure needs --endpoint-name")
        url, key = endpoint_url_and_key(_azure_settings(args), args.endpoint_name)
        source = f"Azure ML endpoint {args.endpoint_name}"
    else:
        url = args.endpoint_url
        key, source = resolve_key(args.api_key_env)

    try:
        connect(url, key, args.name)
    except EndpointError as e:  # a URL that is not http(s)
        raise UserError(f"--endpoint-url: {e}") from None
    print(f"connection {args.name}: endpoint_url={url}, api_key from {source} (stored as a secret)")


def cmd_deploy(args):
    ops.deploy(_azure_settings(args), *args.options)


def cmd_delete(args):
    if not (args.yes or args.dry_run):
        raise UserError("deleting stops the endpoint for its callers; add --yes to confirm (or --dry-run)")
    ops.delete(_azure_settings(args), args.endpoint_name, args.deployment_name, args.dry_run)


def cmd_compare(args):
    (config,) = args.options
    if args.resume:
        compare(replace(config, base="", candidate="", name=args.resume), resume=True)
        return
    if not (config.base and config.candidate):
        raise UserError("compare needs --base and --candidate (deployment names), or --resume NAME")
    compare(config)


def cmd_demo(args):
    run_demo(args.workdir, port=args.port, base_model=args.base_model, tokenizer=args.tokenizer, epochs=args.epochs)


def _add_azure_flags(p, identity: bool = False):
    g = p.add_argument_group("Azure ML (flags override environment variables and .env)")
    for name, (flag, env, what) in SETTINGS.items():
        if name != "identity" or identity:
            g.add_argument(flag, dest=name, default=None, help=f"{what} (env {env})")
    return g


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless there is none to show (None, an empty list, off)."""

    def _get_help_string(self, action):
        if action.default in (None, [], False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(options_of: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. The flags of train, serve, deploy and compare come from their settings' dataclasses
    (OPTIONS) through transformers' HfArgumentParser, whose import takes a second or two: only the command named by
    `options_of` gets them (main() builds only what the command line needs)."""
    parser_class = argparse.ArgumentParser
    if options_of in OPTIONS:
        from transformers import HfArgumentParser

        parser_class = HfArgumentParser  # an ArgumentParser that also takes dataclass_types
    p = argparse.ArgumentParser(
        prog="finetune-phi",
        description="Fine-tune Phi-3 on UltraChat, serve it, chat and evaluate with Prompt flow.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of every error, the one-line ones too")
    p.add_argument(
        "--project",
        default=None,
        metavar="PATH",
        help="the finetune-phi checkout whose flows/, deploy/ and venvs to use (default: the current folder, "
        "else the source of an editable install)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=parser_class)
    fmt = _HelpFormatter
    p.command_parsers = {}  # for --config

    def with_options(name: str, help: str):
        if name != options_of:
            return sub.add_parser(name, help=help, formatter_class=fmt)

        classes = OPTIONS[name]
        q = sub.add_parser(name, help=help, formatter_class=fmt, dataclass_types=classes)
        add_negations(q, *classes)
        bound_flags(q, *classes)
        q.add_argument(
            "--config",
            metavar="YAML",
            default=None,
            help=f"a YAML file of {name} settings, keyed by the flags' names (without --); flags on the "
            "command line override it",
        )
        p.command_parsers[name] = q
        return q

    d = sub.add_parser("data", help="make train/test/eval jsonl from UltraChat", formatter_class=fmt)
    d.add_argument(
        "--source",
        default="sample",
        help="'ultrachat' (HuggingFaceH4/ultrachat_200k from the hub), 'sample' (offline generated), "
        "or a path to an UltraChat-format .jsonl/.json/.parquet",
    )
    d.add_argument("--split", default="train_sft[:1%]", help="hub split to load (datasets slicing syntax)")
    d.add_argument(
        "--test-split",
        default=None,
        help="hub split used as the test set instead of splitting --split, e.g. 'test_sft[:1%%]'",
    )
    d.add_argument("--test-size", type=float, default=0.2, help="fraction of conversations held out for test")
    d.add_argument("--seed", type=int, default=0, help="seed of the split (and of the sample)")
    d.add_argument("--sample-size", type=int, default=600, help="conversations in the generated sample")
    d.add_argument("--skip-invalid", action="store_true", help="skip bad rows (and count them) instead of stopping")
    d.add_argument("--out", default="data", help="output folder")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("tiny", help="build (once) the tiny offline Phi-3 and print its folder", formatter_class=fmt)
    t.add_argument("--tokenizer", default=None, help="build around this real Phi-3 tokenizer folder")
    t.set_defaults(func=cmd_tiny)

    tr = with_options("train", "fine-tune with TRL SFT, log to MLflow and register")
    _add_azure_flags(tr)
    tr.set_defaults(func=cmd_train)

    s = with_options("serve", "run the scoring endpoint locally")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("connect", help="create/update the flows' Prompt flow connection", formatter_class=fmt)
    c.add_argument("--endpoint-url", default=SCORING_URI, help="scoring URI of the endpoint")
    c.add_argument(
        "--api-key-env",
        default=None,
        help="env var holding the key (default: FINETUNE_PHI_API_KEY or the local endpoint's key file)",
    )
    c.add_argument("--name", default=CONNECTION_NAME, help="connection name")
    c.add_argument(
        "--target",
        choices=["local", "azure"],
        default="local",
        help="azure: take the scoring URI and key of --endpoint-name from the workspace",
    )
    c.add_argument("--endpoint-name", default=None, help="Azure ML online endpoint (with --target azure)")
    _add_azure_flags(c)
    c.set_defaults(func=cmd_connect)

    dp = with_options("deploy", "deploy a model to an Azure ML managed online endpoint")
    _add_azure_flags(dp, identity=True)
    dp.set_defaults(func=cmd_deploy)

    de = sub.add_parser(
        "delete", help="delete an Azure ML endpoint or one deployment (stops its cost)", formatter_class=fmt
    )
    de.add_argument("--target", choices=["azure"], default="azure")
    de.add_argument("--endpoint-name", default=ENDPOINT_NAME)
    de.add_argument("--deployment-name", default=None, help="delete only this deployment (it must have no traffic)")
    de.add_argument("--yes", action="store_true", help="confirm the deletion")
    de.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    _add_azure_flags(de)
    de.set_defaults(func=cmd_delete)

    add_export_parser(sub)

    k = with_options("compare", "base vs fine-tuned: chat + eval flow batch runs, paired bootstrap, report")
    k.add_argument(
        "--resume",
        metavar="NAME",
        default=None,
        help="continue the comparison NAME (in --reports) with its saved settings: only lines that "
        "have no answer are asked again",
    )
    k.set_defaults(func=cmd_compare)

    m = sub.add_parser(
        "demo", help="the whole loop offline on a real model (SmolLM2-135M-Instruct)", formatter_class=fmt
    )
    m.add_argument("--workdir", default="demo", help="folder for the demo's data, models, MLflow store and logs")
    m.add_argument(
        "--base-model",
        default=SMOLLM2,
        help="base to fine-tune: smollm2-135m (real weights, several minutes on 2 cores) or tiny (random weights, ~1 min)",
    )
    m.add_argument("--port", type=whole_number(1, 65535), default=PORT, help="endpoint port (a free one if taken)")
    m.add_argument(
        "--tokenizer", default=None, help="with --base-model tiny: build it around this real Phi-3 tokenizer folder"
    )
    m.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (default: train's default)")
    m.set_defaults(func=cmd_demo)
    # `finetune-phi train ... --debug` works as well as `finetune-phi --debug train`
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as finetune-phi --debug")
        command.add_argument("--project", default=argparse.SUPPRESS, metavar="PATH", help="as finetune-phi --project")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; for train, serve, deploy and compare also their settings as objects,
    `.options` (a --config file's values under the flags'). train's: `.train` (TrainConfig), `.launch`
    (TrainLaunch) and `.job` (AzureJobOptions)."""
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(options_of=command)
    args = parser.parse_args(argv)
    if args.command not in OPTIONS:
        return args
    classes = OPTIONS[args.command]
    if args.config:
        load_yaml_defaults(parser.command_parsers[args.command], args.config, classes)
        args = parser.parse_args(argv)  # again: the file's values are now the defaults
    if args.command == "train":
        classes = (TrainConfig, *classes[1:])  # TrainArguments' flags, and the Python API's extra
    args.options = tuple(from_namespace(c, args) for c in classes)
    if args.command == "train":
        args.train, args.launch, args.job = args.options
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. A UserError (a mistake the message explains) is one line and exit code 2; any
    other exception keeps its traceback, which is what a bug report needs. --debug: tracebacks for all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), "")
    debug = "--debug" in argv
    _offline_env()  # before parsing: train's parser imports transformers, which reads these at import
    try:
        args = parse_args(argv)
        project.use(args.project)
        if args.command in MODEL_COMMANDS:
            _quiet_libraries()
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except UserError as e:  # the message says what is wrong and what to do: no stack trace
        if debug:
            raise
        print(f"finetune-phi {command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__module__.startswith("azure.") and not debug:  # auth, permissions, quota: Azure's message says why
            print(
                f"finetune-phi {command}: Azure error: {type(e).__name__}: {e} (--debug shows the traceback)",
                file=sys.stderr,
            )
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
