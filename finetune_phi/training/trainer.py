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
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.read import read_conversations
from ..errors import UserError
from ..files import follow_umask
from ..modeling import memory, models, registry
from . import assistant_mask
from .assistant_mask import tokenize_with_mask
from .callbacks import base_loss_callback, final_eval_loss, loss_progress_bar
from .checkpoints import checkpoint_to_resume
from .config import TrainConfig
from .output_dir import (
    clear_previous_run,
    explain_failed_checkpoint_writes,
    output_lock,
    refuse_to_replace,
    writing,
)


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

    datasets.disable_progress_bars()  # TRL's per-step map() bars drown the training progress bar

    rows = read_conversations(
        path
    )  # checked against its set: never a train split from one `data` run beside another's test split
    if tok is None:
        return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])

    return datasets.Dataset.from_list([tokenize_with_mask(tok, r["messages"], end_of_turn) for r in rows])


def build_trainer(cfg: TrainConfig, output_dir: str | Path, report_to: list[str]):
    """(trainer, tokenizer) for a resolved config: the one place SFT is set up.

    Training and loss-only evaluation both come through here, so a held-out loss measured later
    (`finetune-phi compare`) is computed exactly as the training run computed it.
    """
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

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

        estimate = memory.estimate(
            AutoConfig.from_pretrained(base_path),
            cfg.batch_size,
            cfg.max_length,
            cfg.lora_r if cfg.lora else None,
            2 if on_gpu else 4,
            checkpointing,
            cfg.qlora,
        )
        memory.check_fits(estimate, "cuda" if on_gpu else "cpu")  # a UserError: the numbers and the ways out
    load_kwargs = {}
    if cfg.qlora:
        if not on_gpu:
            raise UserError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use --lora")
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = models.load_causal_lm(base_path, dtype=torch.bfloat16 if on_gpu else torch.float32, **load_kwargs)

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

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
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=load_conversations(cfg.train_file, mask_tok, end_of_turn),
        eval_dataset=load_conversations(cfg.eval_file, mask_tok, end_of_turn),
        processing_class=tok,
        peft_config=peft_config,
    )
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

    # no gradients, activations kept for backward or optimizer state: the training run's memory check
    # (which refused a 135 M model on 40 real rows at "218.6 GiB") does not apply
    cfg = TrainConfig(
        base_model=model,
        train_file=eval_file,
        eval_file=eval_file,
        max_length=max_length,
        batch_size=batch_size,
        skip_memory_check=True,
    ).resolved()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(cfg, tmp, report_to=[])
        return trainer.evaluate()["eval_loss"]


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
    with output_lock(out) if rank0 else nullcontext():
        last = checkpoint_to_resume(out / "checkpoints") if cfg.resume else None
        refuse_to_replace(out, cfg, last)
        if cfg.resume and last is None:
            print(f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from the base model")
        if cfg.overwrite and rank0:
            clear_previous_run(out)
        return _train(cfg, last)


def _previous_run(mlflow, run_id: str):
    """The MLflow run that wrote the checkpoints, or None when this tracking store does not know it."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        print(f"--resume: MLflow run {run_id} is not in this tracking store; continuing in a new run")
        return None


def _train(cfg: TrainConfig, last: Path | None) -> TrainResult:
    start = time.time()
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    trainer, tok = build_trainer(cfg, ckpt_dir, report_to=["mlflow"])
    explain_failed_checkpoint_writes(trainer)
    main = trainer.is_world_process_zero()  # rank 0 of several (torchrun), or the only process

    run_file = ckpt_dir / "mlflow_run_id"
    run_id = run_file.read_text().strip() if last and run_file.exists() else None
    mlflow = registry.setup() if main else None
    previous = _previous_run(mlflow, run_id) if main and run_id else None
    # One MLflow run spans a crash: reopen the interrupted run. Never a FINISHED one: a run reopened
    # is marked FAILED if this attempt crashes, so continuing a finished model is a new run.
    reopen = run_id if previous and previous.info.status != "FINISHED" else None
    with mlflow.start_run(run_id=reopen) if main else nullcontext() as run:
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(run.info.run_id)
        base_eval = None
        if run_id is None:  # not on resume: the model then holds the checkpoint's weights, not the base's
            base_eval = base_loss_callback(
                trainer, (lambda loss: mlflow.log_metric("base_eval_loss", loss)) if main else None
            )
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

                base = AutoModelForCausalLM.from_pretrained(
                    models.resolve(cfg.base_model, cfg.tokenizer), dtype=torch.bfloat16
                )
                model = PeftModel.from_pretrained(base, out / "adapter")
            model = model.merge_and_unload()  # a plain Phi3ForCausalLM the endpoint serves
        # the base's own stop ids plus the template's end of turn: plain generate() stops where the turn ends
        model.generation_config.eos_token_id = models.stop_token_ids(tok, model.generation_config)
        with writing("the model", out):
            model.save_pretrained(out)
            tok.save_pretrained(out)  # the stock template: TRL keeps its training template to itself
            follow_umask(out)  # safetensors writes 0600 (a temp file renamed): give the user's umask, checkpoints too
        summary = {
            "base_model": cfg.base_model,
            "base_eval_loss": base_loss,
            "eval_loss": eval_loss,
            "steps": steps,
            "mlflow_run_id": run.info.run_id,
        }
        version = None
        if cfg.register:
            info = registry.log_model(out, cfg.registered_model)
            version = str(info.registered_model_version)
            summary["registered_model"] = f"models:/{cfg.registered_model}/{version}"
        with writing("the model", out):
            (out / "finetune_phi.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(out, base_loss, eval_loss, steps, time.time() - start, run.info.run_id, version)
