"""Trainer callbacks and what they report: the progress bar and the held-out loss before and after training."""

from __future__ import annotations


def loss_progress_bar():
    """One progress bar for training with the latest loss and an ETA, in place of Trainer's bar, its
    evaluation bars and its raw log dicts (the numbers all reach MLflow anyway)."""
    from transformers import TrainerCallback

    class LossProgressBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            if state.is_world_process_zero:
                self.bar = tqdm(
                    total=state.max_steps,
                    initial=state.global_step,
                    desc="fine-tuning",
                    unit="step",
                    dynamic_ncols=True,
                )

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
