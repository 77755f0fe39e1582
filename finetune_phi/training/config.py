"""Every setting of `finetune-phi train`, in one place.

A field of these dataclasses is one setting: its type, default and help make the command-line flag
(transformers' HfArgumentParser, as TRL's scripts use it: `--base-model` and `--base_model` alike,
`--no-register` for a setting that is on by default), the key of a `--config` YAML file, and the
parameter MLflow logs. The torchrun relaunch and the Azure ML job's command line are written back
from the object by `TrainConfig.to_args()`, and parse back into an equal object.

Nothing heavy is imported here: the parser itself is built in `cli.py`, only for `train`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from ..azureml.options import CPU_VM, GPU_VM
from ..errors import UserError
from ..modeling.registry import REGISTERED_MODEL
from ..options import base_type, setting, type_hints


@dataclass
class TrainArguments:
    """The settings of one training run (model, data, hyperparameters, checkpoints, registry)."""

    base_model: str | None = setting(
        None,
        "smollm2-135m (the real SmolLM2-135M-Instruct, offline), tiny (random weights, for quick checks), a hub "
        "id such as microsoft/Phi-3-mini-4k-instruct, a folder, a .gguf file, or models:/NAME/VERSION "
        "(default: tiny locally, microsoft/Phi-3-mini-4k-instruct with --target azure)",
    )
    tokenizer: str | None = setting(None, "with --base-model tiny: use this real Phi-3 tokenizer folder")
    data: str = setting("data", "folder with train.jsonl and test.jsonl")
    train_file: str | None = setting(None, "overrides DATA/train.jsonl")
    eval_file: str | None = setting(None, "overrides DATA/test.jsonl")
    out: str = setting("models/ft", "output model folder (checkpoints in OUT/checkpoints)")
    lora: bool = setting(False, "train a LoRA adapter, save the merged model")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha (the adapter's scale is alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA layers' input")
    qlora: bool = setting(False, "LoRA over 4-bit base weights (bitsandbytes; GPU only)")
    loss_on: Literal["assistant", "all"] = setting(
        "assistant",
        "assistant: loss on the assistant's tokens only (TRL's training template for the model's chat "
        "template, else a mask derived from it); all: on whole conversations",
    )
    # None = a default that suits the base (resolved()): the tiny model needs far larger steps than a real one
    epochs: float | None = setting(None, "default: 6 for tiny, 1 otherwise")
    lr: float | None = setting(None, "default: 3e-3 tiny (1e-2 LoRA), 5e-6 otherwise (2e-4 LoRA)")
    batch_size: int | None = setting(None, "per device; default 16 tiny, 4 otherwise")
    grad_accum: int = setting(1, "gradient accumulation steps (effective batch: batch size x this x processes)")
    max_length: int | None = setting(None, "tokens per conversation; default 256 tiny, 2048 otherwise")
    warmup: float = setting(0.1, "learning-rate warmup: a fraction of all steps when below 1, else a number of steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    packing: bool = setting(False, "pack conversations into full rows (no padding)")
    activation_checkpointing: bool | None = setting(
        None,
        "recompute activations to save memory (default: on with a GPU; --no-activation-checkpointing: off)",
        nargs="?",
        const=True,
    )
    fsdp: str | None = setting(None, 'FSDP for models too big for one GPU, e.g. "full_shard auto_wrap"')
    deepspeed: str | None = setting(None, "DeepSpeed config JSON (ZeRO), for models too big for one GPU")
    save_steps: int = setting(50, "checkpoint every N steps")
    save_total_limit: int = setting(2, "keep at most this many checkpoints")
    logging_steps: int = setting(5, "log the training loss every N steps")
    seed: int = setting(0, "seed of training (data order, LoRA initialisation)")
    resume: bool = setting(
        False, "continue from the newest checkpoint in OUT/checkpoints that loads (a damaged one is skipped)"
    )
    overwrite: bool = setting(
        False, "replace the model and checkpoints already in OUT (without it, training there is refused)"
    )
    register: bool = setting(True, "register the model as a new version in the MLflow registry (--no-register: don't)")
    registered_model: str = setting(REGISTERED_MODEL, "name of the registered model the version goes to")
    skip_memory_check: bool = setting(False, "train even if the memory estimate says it will not fit")


@dataclass
class TrainConfig(TrainArguments):
    """A training run: the settings above, plus SFTConfig overrides for the Python API only."""

    extra: dict = field(default_factory=dict)  # passed to SFTConfig over the settings (tests, benchmarks)

    def resolved(self) -> TrainConfig:
        """Fill in the defaults that depend on others: data files, the base, base-dependent hyperparameters."""
        cfg = self.with_data_files()
        cfg = replace(cfg, base_model=cfg.base_model or "tiny", lora=cfg.lora or cfg.qlora)
        tiny = cfg.base_model == "tiny"
        # tiny starts from random weights: 6 epochs of the 600-row sample take the answers' shapes
        # (held-out loss 6.95 -> 0.59, ~30 s on 2 cores; 12 epochs: 0.39 in twice the time)
        defaults = dict(
            epochs=6 if tiny else 1,
            lr=(1e-2 if cfg.lora else 3e-3) if tiny else (2e-4 if cfg.lora else 5e-6),
            batch_size=16 if tiny else 4,
            max_length=256 if tiny else 2048,
        )
        cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
        cfg.check()
        return cfg

    # the numbers a run cannot start from: (setting, bound, inclusive, what the value is)
    LIMITS = (
        ("epochs", 0, False, "epochs: 0 steps would register an unchanged copy"),
        ("lr", 0, False, "a learning rate"),
        ("batch_size", 1, True, "rows per step"),
        ("grad_accum", 1, True, "steps per optimizer step"),
        ("max_length", 16, True, "tokens per conversation: the chat template alone takes several"),
        ("lora_r", 1, True, "a LoRA rank"),
        ("save_steps", 1, True, "steps"),
        ("logging_steps", 1, True, "steps"),
        ("save_total_limit", 1, True, "checkpoints kept"),
    )

    def check(self):
        """One line naming the flag for a number no run can start from (--batch-size 0, --epochs -1, ...)."""
        for name, bound, inclusive, what in self.LIMITS:
            value = getattr(self, name)
            if value is not None and (value < bound if inclusive else value <= bound):
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {value}: must be {'at least' if inclusive else 'above'} {bound} ({what})")

    def with_data_files(self) -> TrainConfig:
        """The same run with --data spelled out as its two files (then --data says nothing more)."""
        return replace(
            self,
            data=_DEFAULTS["data"],
            train_file=self.train_file or os.path.join(self.data, "train.jsonl"),
            eval_file=self.eval_file or os.path.join(self.data, "test.jsonl"),
        )

    def to_args(self, exclude: tuple[str, ...] = ()) -> list[str]:
        """The `finetune-phi train` flags that parse back into this config (settings at their default left out)."""
        if self.extra:
            raise ValueError(f"extra={self.extra!r}: SFTConfig overrides have no flag, so a relaunch would lose them")
        hints = type_hints(TrainArguments)
        args = []
        for f in fields(TrainArguments):
            value = getattr(self, f.name)
            if f.name in exclude or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if base_type(hints[f.name]) is bool:
                args.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif value is None:  # None is only ever a default
                raise ValueError(f"{f.name}=None cannot be written as a flag")
            else:
                text = str(value)  # str(float) round-trips exactly
                args += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
        return args


_DEFAULTS = {f.name: f.default for f in fields(TrainArguments)}


@dataclass
class TrainLaunch:
    """Where and how the run is started."""

    target: Literal["local", "azure"] = setting("local", "where the training runs")
    nproc: int = setting(1, "data-parallel processes on this machine (torchrun)")


@dataclass
class AzureJobOptions:
    """The Azure ML job of `--target azure` (the workspace settings are flags of their own)."""

    _argument_group_name = "Azure ML job (with --target azure)"

    compute: str = setting("finetune-phi-gpu", "AmlCompute cluster (created if missing)")
    compute_size: str = setting("gpu", f"gpu ({GPU_VM}), cpu ({CPU_VM}) or a VM size")
    nodes: int = setting(1, "nodes (instance_count) for multi-node training")
    gpus_per_node: int = setting(1, "processes per node (PyTorch distribution)")
    image: str | None = setting(None, "base image of the training environment")
    experiment: str = setting("finetune-phi", "Azure ML experiment name")
    stream: bool = setting(True, "stream the job's log until it ends (--no-stream: submit and return)")
    dry_run: bool = setting(False, "print the YAML of every entity; create nothing")
    dry_run_dir: str = setting("azure-dry-run/train", "where --dry-run writes the YAML")


TRAIN_COMMAND = (TrainArguments, TrainLaunch, AzureJobOptions)  # the dataclasses behind `finetune-phi train`
