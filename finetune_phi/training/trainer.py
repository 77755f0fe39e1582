"""Supervised fine-tuning of a Phi-3-family model on UltraChat conversations with TRL's SFTTrainer.

Conversations go through the model's chat template and the loss covers assistant tokens only.
Every run is an MLflow run (params, loss curves, base and final held-out loss, the model) and
registers a new version of the registered model. `--resume` continues from the latest checkpoint
that loads (and the same MLflow run) after a crash. Under torchrun/accelerate (several processes,
DDP) every rank trains and evaluates; only rank 0 talks to MLflow and writes the model.

Nothing lost, nothing leaked: a run holds a lock on its output folder, never replaces a finished
model or an earlier run's checkpoints unless told (`--overwrite`), never changes the status of a
finished MLflow run, and a folder it cannot write ends it with one line saying why.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import TrainConfig
from ..errors import UserError
from ..files import follow_umask

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there go without the output-folder lock
    fcntl = None


@dataclass
class TrainResult:
    out: Path
    base_eval_loss: float | None
    eval_loss: float
    steps: int
    seconds: float
    run_id: str | None
    registered_version: str | None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.eval_loss, 50))


def load_conversations(path: str, tok=None, end_of_turn: str | None = None):
    """A datasets.Dataset from an UltraChat jsonl, validated line by line: {"messages": [...]} rows,
    or, given a tokenizer, pre-tokenized rows with the assistant mask derived from its template.

    The `prompt` column must go: TRL would take a row with `prompt` for a prompt-completion pair.
    """
    import datasets

    from ..data.prepare import check_set_member, iter_file, load_valid

    datasets.disable_progress_bars()  # TRL's per-step map() bars drown the training progress bar

    check_set_member(path)  # never a train split from one `data` run beside a test split from another
    rows, _ = load_valid(iter_file(path))
    if tok is None:
        return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    from .assistant_mask import tokenize_with_mask

    return datasets.Dataset.from_list([tokenize_with_mask(tok, r["messages"], end_of_turn) for r in rows])


def loss_progress_bar():
    """One progress bar for training with the latest loss and an ETA, in place of Trainer's bar, its
    evaluation bars and its raw log dicts (the numbers all reach MLflow anyway)."""
    from transformers import TrainerCallback

    class LossProgressBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="fine-tuning", unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "eval_loss")}
                if shown:
                    self.bar.set_postfix(shown)

        def on_train_end(self, args, state, control, **kwargs):
            self.close_bar()

        def close_bar(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return LossProgressBar()


def build_trainer(cfg: TrainConfig, output_dir: str | Path, report_to: list[str]):
    """(trainer, tokenizer) for a resolved config: the one place SFT is set up.

    Training and loss-only evaluation both come through here, so a held-out loss measured later
    (`finetune-phi compare`) is computed exactly as the training run computed it.
    """
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from . import assistant_mask
    from ..modeling import models

    on_gpu = torch.cuda.is_available()
    base_path = models.resolve(cfg.base_model, cfg.tokenizer)
    tok = AutoTokenizer.from_pretrained(base_path)
    # Loss on assistant tokens: through TRL's training template when it has one for this template
    # (TRL swaps it in itself), else through a mask derived from the template (pre-tokenized rows).
    derive_mask = cfg.loss_on == "assistant" and assistant_mask.trl_training_template(tok) is None
    end_of_turn = models.end_of_turn_token(tok)
    checkpointing = on_gpu if cfg.activation_checkpointing is None else cfg.activation_checkpointing
    if not cfg.skip_memory_check:
        from transformers import AutoConfig

        from ..modeling import memory

        estimate = memory.estimate(AutoConfig.from_pretrained(base_path), cfg.batch_size, cfg.max_length,
                                   cfg.lora_r if cfg.lora else None, 2 if on_gpu else 4, checkpointing, cfg.qlora)
        try:
            memory.check_fits(estimate, "cuda" if on_gpu else "cpu")
        except ValueError as e:  # the numbers and the ways out: the user's to act on
            raise UserError(str(e)) from None
    load_kwargs = {}
    if cfg.qlora:
        if not on_gpu:
            raise UserError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use --lora")
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = models.load_causal_lm(base_path, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 **load_kwargs)

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")

    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        assistant_only_loss=cfg.loss_on == "assistant" and not derive_mask,  # a derived mask comes as a column
        eval_strategy="epoch",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        bf16=on_gpu,  # SFTConfig defaults to bf16 and checkpointing, which fail on CPU
        activation_checkpointing=checkpointing,
        dataloader_pin_memory=on_gpu,
        # CPU data parallelism (torchrun on CPU) needs both, or Trainer runs each process alone
        use_cpu=not on_gpu,
        ddp_backend="gloo" if not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        packing=cfg.packing,
        report_to=report_to,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # trained tokens, for throughput figures
    )
    settings.update({k: v for k, v in (("fsdp", cfg.fsdp), ("deepspeed", cfg.deepspeed)) if v})
    args = SFTConfig(**{**settings, **cfg.extra})
    mask_tok = tok if derive_mask else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_conversations(cfg.train_file, mask_tok, end_of_turn),
                         eval_dataset=load_conversations(cfg.eval_file, mask_tok, end_of_turn),
                         processing_class=tok, peft_config=peft_config)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    trainer.add_callback(loss_progress_bar())
    return trainer, tok


def heldout_loss(model: str, eval_file: str, max_length: int | None = None, batch_size: int = 16) -> float:
    """Assistant-token loss of a model (any spec) on an UltraChat jsonl, as training measures it.

    The Trainer averages per-batch means, so the figure depends a little on batch size: compare
    models at the same one (16, the tiny model's training batch, by default).
    """
    import tempfile

    # no gradients, activations kept for backward or optimizer state: the training run's memory check
    # (which refused a 135 M model on 40 real rows at "218.6 GiB") does not apply
    cfg = TrainConfig(base_model=model, train_file=eval_file, eval_file=eval_file, max_length=max_length,
                      batch_size=batch_size, skip_memory_check=True).resolved()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(cfg, tmp, report_to=[])
        return trainer.evaluate()["eval_loss"]


def checkpoint_problem(path: Path) -> str | None:
    """Why resuming from this checkpoint would fail, or None when everything it needs loads.

    A process killed mid-save or a full disk leaves files cut short; Trainer only finds out by
    crashing (`PytorchStreamReader failed reading zip archive`). Each file is opened the way resuming
    opens it, but cheaply: safetensors headers (which state how long the file must be) and torch
    files memory-mapped, so no tensor data is read.
    """
    try:
        json.loads((path / "trainer_state.json").read_text())  # Trainer writes it last
    except (OSError, ValueError) as e:
        return f"trainer_state.json is missing or unreadable ({_reason(e)})"
    weights = [path / f for f in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin",
                                  "adapter_model.bin") if (path / f).exists()]
    index = path / "model.safetensors.index.json"
    if index.exists():  # a sharded model: every shard the index names
        try:
            weights += [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as e:
            return f"{index.name} is unreadable ({_reason(e)})"
    if not weights:
        return "it has no model weights"
    for f in weights + [path / "optimizer.pt", path / "scheduler.pt"]:
        if not f.exists():
            return f"{f.name} is missing"
        if problem := _unloadable(f):
            return f"{f.name} does not load ({problem})"
    for f in path.glob("rng_state*.pth"):  # numpy state inside: weights_only refuses it, so check the zip only
        import zipfile

        try:
            zipfile.ZipFile(f).close()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{f.name} does not load ({_reason(e)})"
    return None


def _unloadable(f: Path) -> str | None:
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt"):
                pass
        else:
            import torch

            torch.load(f, map_location="cpu", weights_only=True, mmap=True)  # as Trainer loads it, less the data
    except Exception as e:  # noqa: BLE001 - whatever the reader says is the reason to skip the file
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    """The first sentence of an error: torch's go on for a paragraph."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].split(". ")[0]


def complete_checkpoint(path: Path) -> bool:
    return checkpoint_problem(path) is None


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint-N that loads; a half-written or damaged one is skipped, saying why."""
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"--resume: skipping incomplete checkpoint {path}: {problem}")
    return None


def final_eval_loss(trainer) -> float:
    """Held-out loss of the trained model: the end-of-epoch evaluation's when it ran at the last
    step (evaluating the same weights again costs as much as an epoch of a small data set on CPU)."""
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == state.global_step:
                return entry["eval_loss"]
            break
    return trainer.evaluate()["eval_loss"]


def base_loss_callback(trainer, on_measured=None):
    """A callback measuring the untouched base model's held-out loss as training starts (all ranks).

    Not with evaluate() before train(): in transformers 5.24 that leaves the model without its DDP
    wrapper, and each process of a multi-process run then trains alone on its shard (measured: held-out
    loss 0.92 instead of 0.79). The value is in `.loss` afterwards.
    """
    from transformers import TrainerCallback

    class BaseLoss(TrainerCallback):
        loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.loss is None:
                self.loss = trainer.evaluate(metric_key_prefix="base")["base_loss"]
                if on_measured:  # recorded now, so a run killed later still has it on resume
                    on_measured(self.loss)

    return BaseLoss()


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune, track in MLflow, save and register; UserError for a folder it must not or cannot use.

    The folder checks come before any weights load, so a mistake costs seconds, not a training run.
    """
    cfg = cfg.resolved()
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the model")
    # Every rank of a torchrun job runs this; rank 0 owns the folder (lock, clean-up), the others read it.
    rank0 = os.environ.get("RANK", "0") == "0"
    with _output_lock(out) if rank0 else nullcontext():
        last = _checkpoint_to_resume(out / "checkpoints") if cfg.resume else None
        _refuse_to_replace(out, cfg, last)
        if cfg.resume and last is None:
            print(f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from the base model")
        if cfg.overwrite and rank0:
            _clear_previous_run(out)
        return _train(cfg, last)


@contextmanager
def _output_lock(out: Path):
    """Hold an flock on <out>/.lock for the whole run, so a second run on the same folder stops at once.

    The kernel drops the lock when the process ends, however it ends: a crash never leaves a stale
    lock. Creating the lock file also proves the folder writable before anything is loaded.
    """
    def unwritable(e: OSError):
        return UserError(f"cannot write to --out {out}: {e.strerror or _reason(e)}; choose a folder you can write to")

    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")  # append mode: a run that loses the race can still read the PID
    except OSError as e:
        raise unwritable(e) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise UserError(f"{out} is in use by another training run (PID {holder})") from None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
        except OSError as e:  # a full disk, before anything was loaded
            raise unwritable(e) from None
        yield
    finally:
        lock.close()


def _checkpoint_to_resume(ckpt_dir: Path) -> Path | None:
    last = latest_complete_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if last is not None:
        step = json.loads((last / "trainer_state.json").read_text()).get("global_step")
        print(f"--resume: resuming from {last} (step {step})")
    return last


def _refuse_to_replace(out: Path, cfg: TrainConfig, last: Path | None):
    """A finished model or an earlier run's checkpoints in `out` are only replaced on --overwrite.

    Starting afresh over them would overwrite the model and mix the two runs' checkpoints, which
    save_total_limit then deletes.
    """
    if cfg.overwrite or last is not None:  # resuming continues the run these files belong to
        return
    if (out / "finetune_phi.json").exists() or (out / "config.json").exists():
        held = "a trained model"
    elif any(p.is_dir() for p in (out / "checkpoints").glob("checkpoint-*")):
        held = "checkpoints of an earlier run"
    else:
        return
    if cfg.resume:
        raise UserError(f"--resume: nothing in {out / 'checkpoints'} to resume from, and {out} holds {held}; "
                        "use --overwrite to replace it")
    raise UserError(f"{out} already holds {held}; use --resume to continue its run or --overwrite to replace it")


def _clear_previous_run(out: Path):
    """--overwrite: remove what training wrote there before, and nothing else (--out . is a folder of yours)."""
    removed = []
    for stale in (out / "checkpoints", out / "adapter", out / "finetune_phi.json"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
        else:
            continue
        removed.append(stale.name)
    if removed:
        print(f"--overwrite: removed {', '.join(removed)} from {out}")


def _previous_run(mlflow, run_id: str):
    """The MLflow run that wrote the checkpoints, or None when this tracking store does not know it."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        print(f"--resume: MLflow run {run_id} is not in this tracking store; continuing in a new run")
        return None


@contextmanager
def _writing(what: str, path: Path):
    """A failed write (full disk, quota, a folder gone read-only) ends the run with one line saying so.

    torch.save and safetensors report it as "basic_ios::clear: iostream error", "unexpected pos N vs M"
    or "I/O error"; a RuntimeError that looks like none of those, with room on the disk, stays a bug.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        free = _free_bytes(path)
        io_like = isinstance(e, OSError) or any(s in str(e) for s in (
            "iostream", "unexpected pos", "file write failed", "I/O error", "os error"))
        if not io_like and (free is None or free > 64 * 2**20):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _reason(e)
        room = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        raise UserError(f"could not write {what} to {path}: {reason}{room}; free disk space or choose another --out") from e


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _explain_failed_checkpoint_writes(trainer):
    """Checkpoints are written inside trainer.train(): wrap Trainer's one method that writes them."""
    save = trainer._save_checkpoint

    def save_checkpoint(model, trial, *args, **kwargs):
        path = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        with _writing("checkpoint", path):
            return save(model, trial, *args, **kwargs)

    trainer._save_checkpoint = save_checkpoint


def _train(cfg: TrainConfig, last: Path | None) -> TrainResult:
    from ..modeling import models, registry

    start = time.time()
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    trainer, tok = build_trainer(cfg, ckpt_dir, report_to=["mlflow"])
    _explain_failed_checkpoint_writes(trainer)
    main = trainer.is_world_process_zero()  # rank 0 of several (torchrun), or the only process

    run_file = ckpt_dir / "mlflow_run_id"
    run_id = run_file.read_text().strip() if last and run_file.exists() else None
    mlflow = registry.setup() if main else None
    previous = _previous_run(mlflow, run_id) if main and run_id else None
    # One MLflow run spans a crash: reopen the interrupted run. Never a FINISHED one: a run reopened
    # is marked FAILED if this attempt crashes, so continuing a finished model is a new run.
    reopen = run_id if previous and previous.info.status != "FINISHED" else None
    with (mlflow.start_run(run_id=reopen) if main else nullcontext()) as run:
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(run.info.run_id)
        base_eval = None
        if run_id is None:  # not on resume: the model then holds the checkpoint's weights, not the base's
            base_eval = base_loss_callback(trainer, (lambda loss: mlflow.log_metric("base_eval_loss", loss)) if main else None)
            trainer.add_callback(base_eval)
        base_loss = previous.data.metrics.get("base_eval_loss") if previous else None
        if main and reopen is None:  # a new MLflow run
            mlflow.log_params({f"finetune_phi.{k}": v for k, v in asdict(cfg).items() if k != "extra"})
            if run_id:
                mlflow.set_tag("finetune_phi.resumed_from_run", run_id)
                if base_loss is not None:
                    mlflow.log_metric("base_eval_loss", base_loss)
        try:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
        finally:  # Trainer skips on_train_end when it fails: end the bar's line before any error line
            for callback in trainer.callback_handler.callbacks:
                if hasattr(callback, "close_bar"):
                    callback.close_bar()
        if base_eval:
            base_loss = base_eval.loss
        eval_loss = final_eval_loss(trainer)
        steps = trainer.state.global_step
        if not main:
            return TrainResult(out, base_loss, eval_loss, steps, time.time() - start, None, None)
        mlflow.log_metrics({"final_eval_loss": eval_loss, "final_eval_perplexity": math.exp(min(eval_loss, 50))})

        model = trainer.model
        if cfg.lora:
            model.save_pretrained(out / "adapter")
            if cfg.qlora:  # 4-bit weights cannot take the merge: apply the adapter to a bf16 copy of the base
                import torch
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(models.resolve(cfg.base_model, cfg.tokenizer),
                                                            dtype=torch.bfloat16)
                model = PeftModel.from_pretrained(base, out / "adapter")
            model = model.merge_and_unload()  # a plain Phi3ForCausalLM the endpoint serves
        # the base's own stop ids plus the template's end of turn: plain generate() stops where the turn ends
        model.generation_config.eos_token_id = models.stop_token_ids(tok, model.generation_config)
        with _writing("the model", out):
            model.save_pretrained(out)
            tok.save_pretrained(out)  # the stock template: TRL keeps its training template to itself
            follow_umask(out)  # safetensors writes 0600 (a temp file renamed): give the user's umask, checkpoints too
        summary = {"base_model": cfg.base_model, "base_eval_loss": base_loss, "eval_loss": eval_loss,
                   "steps": steps, "mlflow_run_id": run.info.run_id}
        version = None
        if cfg.register:
            info = registry.log_model(out, cfg.registered_model)
            version = str(info.registered_model_version)
            summary["registered_model"] = f"models:/{cfg.registered_model}/{version}"
        with _writing("the model", out):
            (out / "finetune_phi.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(out, base_loss, eval_loss, steps, time.time() - start, run.info.run_id, version)
