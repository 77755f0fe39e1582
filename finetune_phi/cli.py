"""`finetune-phi`: one command with a subcommand per stage of the loop.

Heavy libraries (torch, transformers, trl, mlflow, promptflow) are imported inside each command,
so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from . import project
from .errors import UserError


def _offline_env():
    # Respect the user's settings; without a hub these keep transformers/datasets from resolving hosts.
    if os.environ.get("FINETUNE_PHI_OFFLINE", "") == "1":
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    # Prompt flow's Azure Monitor exporter asks settings.sdk.monitor.azure.com (and retries in vain
    # offline) unless told not to; every command that runs pf in-process (compare, connect, demo) inherits this
    for var in ("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"):
        os.environ.setdefault(var, "true")


def _at_least(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` (to `high`); anything else is argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {low} to {high}" if high is not None
                                             else f"{value} is too small: give at least {low}")
        return value
    parse.__name__ = "number"  # what argparse calls it in its message
    return parse


PORT = _at_least(1, 65535)
POSITIVE = _at_least(1)


COMMANDS = ("data", "tiny", "train", "serve", "connect", "deploy", "delete", "compare", "demo", "export")
MODEL_COMMANDS = ("train", "serve", "demo", "compare", "tiny")


def _quiet_libraries():
    """Commands that load models show their own progress (one bar for training, a line per stage):
    transformers' per-file bars (loading weights, writing shards, converting GGUF) and a deprecation
    warning raised inside peft/TRL on every run would only bury it. MLflow's INFO lines (creating its
    tables) and its warnings about a local model having no hub model card or license say nothing to act on."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # MLflow sets its loggers' level when it is imported (later, inside the command): its own switch says it
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def cmd_data(args):
    from .data.prepare import prepare

    result = prepare(args.source, args.out, split=args.split, test_split=args.test_split, test_size=args.test_size,
                     seed=args.seed, skip_invalid=args.skip_invalid, sample_size=args.sample_size)
    if result.skipped:
        print(f"skipped {len(result.skipped)} invalid rows, first: {result.skipped[0]}", file=sys.stderr)
    if result.duplicates:
        print(f"dropped {result.duplicates} rows whose prompt_id repeats an earlier row's", file=sys.stderr)
    read = ", ".join(f"{n} rows in {form} form" for form, n in result.formats.items())
    print(f"read {read}; wrote {result.out}/train.jsonl ({result.train} rows), test.jsonl ({result.test}), "
          f"eval.jsonl ({result.eval})")


def cmd_tiny(args):
    from .modeling.models import tiny_path

    print(tiny_path(args.tokenizer))


def _relaunch_with_torchrun(cfg, nproc: int, debug: bool) -> int:
    """`train --nproc N`: the same run under torchrun, N data-parallel processes (gloo on CPU, NCCL on GPU).

    The command line is written from the parsed config, so a --config file's settings travel too."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "finetune_phi.cli", *(["--debug"] if debug else []), "train", *cfg.to_args()]
    print("running: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _azure_settings(args):
    from .azureml.settings import AzureSettings

    return AzureSettings.load(subscription_id=args.subscription_id, resource_group=args.resource_group,
                              workspace=args.workspace, location=args.location, identity=getattr(args, "identity", None))


def cmd_train(args):
    from dataclasses import replace

    cfg, launch, job = args.train, args.launch, args.job
    if launch.target == "azure":
        from .azureml import ops
        from .modeling.models import DEFAULT_HUB_MODEL

        if cfg.tokenizer or cfg.resume or cfg.overwrite:
            raise UserError("--tokenizer, --resume and --overwrite are local options; an Azure job starts from "
                            "--base-model and writes a new output")
        # Azure's GPUs get the tutorial's Phi-3 (a laptop the quick tiny model: TrainConfig.resolved)
        ops.train(_azure_settings(args), replace(cfg, base_model=cfg.base_model or DEFAULT_HUB_MODEL), job)
        return 0
    if job.dry_run:
        raise UserError("--dry-run applies to --target azure")
    if launch.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(cfg, launch.nproc, args.debug)
    from .training.trainer import train

    r = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0  # another rank of a multi-process run: rank 0 reports
    base = f"{r.base_eval_loss:.4f}" if r.base_eval_loss is not None else "unknown"  # a resume can lack it
    print(f"\nheld-out loss: base {base} -> fine-tuned {r.eval_loss:.4f} "
          f"(perplexity {r.perplexity:.2f}); {r.steps} steps in {r.seconds:.0f} s")
    print(f"model folder: {r.out}")
    if r.registered_version:
        print(f"registered:   models:/{cfg.registered_model}/{r.registered_version} (MLflow run {r.run_id})")
    return 0


@contextmanager
def _flag_errors():
    """serve.py's flag parsers and connection.py's key lookup report a bad flag or a missing key as a
    ValueError whose message names it: the user's mistake, shown as one line."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e)) from e


def cmd_serve(args):
    from .serving.app import serve
    from .serving.endpoint import Limits, parse_pairs, parse_traffic

    with _flag_errors():
        deployments = parse_pairs(args.deployment or ["default=tiny"], "deployment")
        traffic = parse_traffic(args.traffic or [], list(deployments))
    limits = Limits(max_concurrent_requests_per_instance=args.max_concurrent_requests,
                    max_queue_wait_ms=args.max_queue_wait_ms, request_timeout_ms=args.request_timeout_ms,
                    max_body_bytes=args.max_body_bytes, max_new_tokens_cap=args.max_new_tokens_cap)
    options = {}
    if args.kv_cache_tokens is not None:
        if args.engine != "transformers":
            raise UserError(f"--kv-cache-tokens sizes the transformers engine's cache, not the {args.engine} engine's")
        options["kv_cache_tokens"] = args.kv_cache_tokens
    serve(deployments, traffic, args.host, args.port, limits, engine=args.engine, engine_options=options)


def cmd_connect(args):
    from .serving.connection import connect, resolve_key

    if args.target == "azure":
        from .azureml.ops import endpoint_url_and_key

        if not args.endpoint_name:
            raise UserError("--target azure needs --endpoint-name")
        url, key = endpoint_url_and_key(_azure_settings(args), args.endpoint_name)
        source = f"Azure ML endpoint {args.endpoint_name}"
    else:
        url = args.endpoint_url
        with _flag_errors():
            key, source = resolve_key(args.api_key_env)
    from .serving.client import EndpointError

    try:
        connect(url, key, args.name)
    except EndpointError as e:  # a URL that is not http(s)
        raise UserError(f"--endpoint-url: {e}") from None
    print(f"connection {args.name}: endpoint_url={url}, api_key from {source} (stored as a secret)")


def cmd_deploy(args):
    from pathlib import Path

    from .azureml import ops
    from .serving.endpoint import parse_weights

    with _flag_errors():
        traffic = parse_weights(args.traffic) if args.traffic else {args.deployment_name: 100}
    if args.deployment_name not in traffic:
        traffic[args.deployment_name] = 0  # created and reachable by header, no traffic yet
    # the quantized CPU engine runs on a CPU VM (the original tutorial's size); the others on an A100 by default
    instance_type = args.instance_type or ("Standard_E4s_v3" if args.engine == "openvino" else "Standard_NC24ads_A100_v4")
    ops.deploy(_azure_settings(args), args.endpoint_name, args.deployment_name, args.model, traffic,
               instance_type, args.instance_count, args.max_concurrent_requests, args.request_timeout_ms,
               args.max_queue_wait_ms, args.image, args.dry_run, Path(args.dry_run_dir), engine=args.engine)


def cmd_delete(args):
    from .azureml import ops

    if not (args.yes or args.dry_run):
        raise UserError("deleting stops the endpoint for its callers; add --yes to confirm (or --dry-run)")
    ops.delete(_azure_settings(args), args.endpoint_name, args.deployment_name, args.dry_run)


def cmd_compare(args):
    from .evaluation.compare import CompareConfig, compare, parse_share

    if args.resume:
        compare(CompareConfig(base="", candidate="", name=args.resume, reports=args.reports), resume=True)
        return
    if not (args.base and args.candidate):
        raise UserError("compare needs --base and --candidate (deployment names), or --resume NAME")
    compare(CompareConfig(
        base=args.base, candidate=args.candidate, data=args.data, name=args.name, base_model=args.base_model,
        candidate_model=args.candidate_model, test_file=args.test_file, base_connection=args.base_connection,
        candidate_connection=args.candidate_connection, reports=args.reports, runner=args.runner, workers=args.workers,
        temperature=args.temperature, max_tokens=args.max_tokens, max_failed=parse_share(args.max_failed),
        judge=args.judge, judge_model=args.judge_model, judge_evaluators=args.judge_evaluators))


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.workdir, port=args.port, base_model=args.base_model, tokenizer=args.tokenizer, epochs=args.epochs)


def _add_azure_flags(p, identity: bool = False):
    from .azureml.settings import SETTINGS

    g = p.add_argument_group("Azure ML (flags override environment variables and .env)")
    for name, (flag, env, what) in SETTINGS.items():
        if name != "identity" or identity:
            g.add_argument(flag, dest=name, default=None, help=f"{what} (env {env})")
    return g


def build_parser(train_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line. `train`'s flags come from the dataclasses in config.py through
    transformers' HfArgumentParser, whose import takes a second or two: `train_flags=False` leaves
    them out, for commands other than train (main() builds only what the command line needs)."""
    parser_class = argparse.ArgumentParser
    if train_flags:
        from transformers import HfArgumentParser

        parser_class = HfArgumentParser  # an ArgumentParser that also takes dataclass_types
    p = argparse.ArgumentParser(prog="finetune-phi", description="Fine-tune Phi-3 on UltraChat, serve it, chat and evaluate with Prompt flow.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of every error, the one-line ones too")
    p.add_argument("--project", default=None, metavar="PATH",
                   help="the finetune-phi checkout whose flows/, deploy/ and venvs to use (default: the current folder, "
                        "else the source of an editable install)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=parser_class)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("data", help="make train/test/eval jsonl from UltraChat", formatter_class=fmt)
    d.add_argument("--source", default="sample",
                   help="'ultrachat' (HuggingFaceH4/ultrachat_200k from the hub), 'sample' (offline generated), "
                        "or a path to an UltraChat-format .jsonl/.json/.parquet")
    d.add_argument("--split", default="train_sft[:1%]", help="hub split to load (datasets slicing syntax)")
    d.add_argument("--test-split", default=None, help="hub split used as the test set instead of splitting --split, e.g. 'test_sft[:1%%]'")
    d.add_argument("--test-size", type=float, default=0.2, help="fraction of conversations held out for test")
    d.add_argument("--seed", type=int, default=0, help="seed of the split (and of the sample)")
    d.add_argument("--sample-size", type=int, default=600, help="conversations in the generated sample")
    d.add_argument("--skip-invalid", action="store_true", help="skip bad rows (and count them) instead of stopping")
    d.add_argument("--out", default="data", help="output folder")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("tiny", help="build (once) the tiny offline Phi-3 and print its folder", formatter_class=fmt)
    t.add_argument("--tokenizer", default=None, help="build around this real Phi-3 tokenizer folder")
    t.set_defaults(func=cmd_tiny)

    train_help = "fine-tune with TRL SFT, log to MLflow and register"
    if train_flags:
        from .training.config import TRAIN_COMMAND, TrainArguments, add_negations

        tr = sub.add_parser("train", help=train_help, formatter_class=fmt, dataclass_types=TRAIN_COMMAND)
        add_negations(tr, TrainArguments)
        tr.add_argument("--config", metavar="YAML", default=None,
                        help="a YAML file of train settings, keyed by the flags' names (base_model: tiny, lora: "
                             "true, lr: 2.0e-4, ...); flags on the command line override it")
        _add_azure_flags(tr)
    else:
        tr = sub.add_parser("train", help=train_help, formatter_class=fmt)
    p.train_parser = tr  # for --config
    tr.set_defaults(func=cmd_train)

    s = sub.add_parser("serve", help="run the scoring endpoint locally", formatter_class=fmt)
    s.add_argument("--deployment", action="append", metavar="NAME=MODEL",
                   help="a deployment: MODEL is tiny, a folder or models:/NAME/VERSION (repeat; default default=tiny)")
    s.add_argument("--traffic", action="append", metavar="NAME=PCT",
                   help="traffic split in percent, summing to 100 (default: all to the first deployment)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=PORT, default=5000)
    s.add_argument("--max-concurrent-requests", type=POSITIVE, default=32, help="in flight at once; more get 429")
    s.add_argument("--max-queue-wait-ms", type=POSITIVE, default=5000, help="longest wait before decoding starts; then 408")
    s.add_argument("--request-timeout-ms", type=POSITIVE, default=180000,
                   help="longest request; then 503 (Azure ML's maximum: CPU answers can take minutes)")
    s.add_argument("--max-body-bytes", type=POSITIVE, default=1_000_000, help="larger request bodies get 413")
    s.add_argument("--max-new-tokens-cap", type=POSITIVE, default=1024, help="largest max_new_tokens / max_tokens accepted")
    s.add_argument("--kv-cache-tokens", type=_at_least(16), default=None,
                   help="the transformers engine's KV cache in tokens (default 16384): a request starts when its prompt "
                        "and max_new_tokens fit beside those decoding, else waits (408 after --max-queue-wait-ms)")
    from .serving.engines.base import DEFAULT_ENGINE, ENGINES

    s.add_argument("--engine", choices=sorted(ENGINES), default=DEFAULT_ENGINE,
                   help="what decodes: transformers (continuous batching, CPU or GPU), vllm (CUDA GPU); see README")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("connect", help="create/update the flows' Prompt flow connection", formatter_class=fmt)
    c.add_argument("--endpoint-url", default="http://127.0.0.1:5000/score", help="scoring URI of the endpoint")
    c.add_argument("--api-key-env", default=None,
                   help="env var holding the key (default: FINETUNE_PHI_API_KEY or the local endpoint's key file)")
    c.add_argument("--name", default="finetune_phi_endpoint", help="connection name")
    c.add_argument("--target", choices=["local", "azure"], default="local",
                   help="azure: take the scoring URI and key of --endpoint-name from the workspace")
    c.add_argument("--endpoint-name", default=None, help="Azure ML online endpoint (with --target azure)")
    _add_azure_flags(c)
    c.set_defaults(func=cmd_connect)

    dp = sub.add_parser("deploy", help="deploy a model to an Azure ML managed online endpoint", formatter_class=fmt)
    dp.add_argument("--target", choices=["azure"], default="azure", help="locally, use `finetune-phi serve`")
    dp.add_argument("--model", required=True, help="job:JOB_NAME (a training job's output), a model folder, or azureml:NAME:VERSION")
    dp.add_argument("--endpoint-name", default="finetune-phi", help="online endpoint (kept if it exists)")
    dp.add_argument("--deployment-name", default="ft", help="deployment to create or update")
    dp.add_argument("--traffic", action="append", metavar="NAME=PCT",
                    help="traffic after the deployment, e.g. --traffic ft=10 --traffic blue=90 (default: all to it)")
    dp.add_argument("--engine", choices=sorted(ENGINES), default=DEFAULT_ENGINE,
                    help="what deploy/score.py serves the model with (FINETUNE_PHI_ENGINE in the deployment); "
                         "openvino takes a folder made by `finetune-phi export --format openvino`")
    dp.add_argument("--instance-type", default=None,
                    help="VM size of each instance (default: Standard_E4s_v3 for --engine openvino, else Standard_NC24ads_A100_v4)")
    dp.add_argument("--instance-count", type=int, default=1)
    dp.add_argument("--max-concurrent-requests", type=int, default=1, help="max_concurrent_requests_per_instance")
    dp.add_argument("--request-timeout-ms", type=int, default=90000, help="request_timeout_ms (Azure caps it at 180000)")
    dp.add_argument("--max-queue-wait-ms", type=int, default=500, help="max_queue_wait_ms")
    dp.add_argument("--image", default=None, help="base image of the scoring environment")
    dp.add_argument("--dry-run", action="store_true", help="print the YAML of every entity; create nothing")
    dp.add_argument("--dry-run-dir", default="azure-dry-run/deploy", help="where --dry-run writes the YAML")
    _add_azure_flags(dp, identity=True)
    dp.set_defaults(func=cmd_deploy)

    de = sub.add_parser("delete", help="delete an Azure ML endpoint or one deployment (stops its cost)", formatter_class=fmt)
    de.add_argument("--target", choices=["azure"], default="azure")
    de.add_argument("--endpoint-name", default="finetune-phi")
    de.add_argument("--deployment-name", default=None, help="delete only this deployment (it must have no traffic)")
    de.add_argument("--yes", action="store_true", help="confirm the deletion")
    de.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    _add_azure_flags(de)
    de.set_defaults(func=cmd_delete)

    from .modeling.export import add_export_parser

    add_export_parser(sub)

    k = sub.add_parser("compare", help="base vs fine-tuned: chat + eval flow batch runs, paired bootstrap, report",
                       formatter_class=fmt)
    k.add_argument("--base", default=None, help="deployment name answering as the base (e.g. base)")
    k.add_argument("--candidate", default=None, help="deployment name answering as the fine-tuned model (e.g. ft)")
    k.add_argument("--data", default="data/eval.jsonl", help="eval rows (question, chat_history, ground_truth)")
    k.add_argument("--name", default=None, help="prefix of the pf run names and the report folder (default: timestamped)")
    k.add_argument("--base-model", default=None, help="model of the base deployment, to report held-out loss too")
    k.add_argument("--candidate-model", default=None, help="model of the candidate deployment, for held-out loss")
    k.add_argument("--test-file", default=None, help="UltraChat rows for the loss (default: test.jsonl beside --data)")
    k.add_argument("--base-connection", default=None, help="pf connection for the base (default finetune_phi_endpoint)")
    k.add_argument("--candidate-connection", default=None, help="pf connection for the candidate")
    k.add_argument("--reports", default="reports", help="folder for the report")
    from .evaluation.compare import DEFAULT_WORKERS

    k.add_argument("--workers", type=POSITIVE, default=DEFAULT_WORKERS,
                   help="chat lines in flight per batch run (Prompt flow's PF_WORKER_COUNT for that run)")
    k.add_argument("--runner", choices=["promptflow", "maf"], default="promptflow",
                   help="promptflow: flows/chat + flows/eval as pf runs; maf: their Microsoft Agent Framework "
                        "twins flows/chat-maf + flows/eval-maf (in .venv-maf, made by `make maf`)")
    k.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of both sides; 0 = greedy, so the same compare gives the same table")
    k.add_argument("--max-tokens", type=POSITIVE, default=None, help="longest answer in tokens (default: the endpoint's)")
    k.add_argument("--max-failed", default="5%",
                   help="exit non-zero (after writing the report) when a side fails more than this share of lines")
    k.add_argument("--judge", metavar="CONNECTION", default=None,
                   help="also judge each paired line in both orders (MT-Bench's pairwise protocol) with the chat model "
                        "behind this Prompt flow connection (type open_ai or azure_open_ai)")
    k.add_argument("--judge-model", default=None,
                   help="the judge's model (OpenAI; default gpt-4o) or deployment name (Azure OpenAI, required)")
    k.add_argument("--judge-evaluators", metavar="NAMES", default="",
                   help="also score both answers with Azure AI Evaluation's evaluators, asked of the judge model: "
                        "a comma-separated list of coherence, fluency, relevance, similarity (1-5, paired CIs)")
    k.add_argument("--resume", metavar="NAME", default=None,
                   help="continue the comparison NAME (in --reports) with its saved settings: only lines that "
                        "have no answer are asked again")
    k.set_defaults(func=cmd_compare)

    m = sub.add_parser("demo", help="the whole loop offline on a real model (SmolLM2-135M-Instruct)", formatter_class=fmt)
    m.add_argument("--workdir", default="demo", help="folder for the demo's data, models, MLflow store and logs")
    m.add_argument("--base-model", default="smollm2-135m",
                   help="base to fine-tune: smollm2-135m (real weights, several minutes on 2 cores) or tiny (random weights, ~1 min)")
    m.add_argument("--port", type=PORT, default=5000, help="endpoint port (a free one if taken)")
    m.add_argument("--tokenizer", default=None, help="with --base-model tiny: build it around this real Phi-3 tokenizer folder")
    m.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (default: train's default)")
    m.set_defaults(func=cmd_demo)
    for command in sub.choices.values():  # `finetune-phi train ... --debug` works as well as `finetune-phi --debug train`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as finetune-phi --debug")
        command.add_argument("--project", default=argparse.SUPPRESS, metavar="PATH", help="as finetune-phi --project")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; for `train`, also its settings as objects: `.train` (TrainConfig),
    `.launch` (TrainLaunch) and `.job` (AzureJobOptions), a --config file's values under the flags."""
    parser = build_parser(train_flags="train" in argv)
    args = parser.parse_args(argv)
    if args.command == "train":
        from .training.config import AzureJobOptions, TrainConfig, TrainLaunch, from_namespace, load_yaml_defaults

        if args.config:
            load_yaml_defaults(parser.train_parser, args.config)
            args = parser.parse_args(argv)  # again: the file's values are now the defaults
        args.train, args.launch, args.job = (from_namespace(c, args) for c in (TrainConfig, TrainLaunch, AzureJobOptions))
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
            print(f"finetune-phi {command}: Azure error: {type(e).__name__}: {e} (--debug shows the traceback)",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
