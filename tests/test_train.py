import json
from pathlib import Path

import pytest
import torch
from support import PHI3_TOKENIZER, ULTRACHAT40

from finetune_phi.modeling import models, registry
from finetune_phi.training.trainer import TrainConfig, train


pytestmark = pytest.mark.slow  # every test here trains, serves or runs pf


def test_fine_tune_beats_the_base_on_held_out_conversations(trained):
    assert trained.base_eval_loss > 5  # a random-init model is near uniform over the vocabulary
    assert trained.eval_loss < 0.25 * trained.base_eval_loss
    assert (trained.out / "config.json").exists() and (trained.out / "tokenizer.json").exists()
    saved = json.loads((trained.out / "finetune_phi.json").read_text())
    assert saved["eval_loss"] == pytest.approx(trained.eval_loss)


def test_training_is_an_mlflow_run_with_a_registered_version(trained):
    mlflow = registry.setup()
    client = mlflow.MlflowClient()
    run = client.get_run(trained.run_id)
    assert run.data.params["finetune_phi.base_model"] == "tiny"
    assert run.data.metrics["base_eval_loss"] == pytest.approx(trained.base_eval_loss)
    assert run.data.metrics["final_eval_loss"] == pytest.approx(trained.eval_loss)
    assert len(client.get_metric_history(trained.run_id, "loss")) > 10  # the loss curve, not one number
    version = client.get_model_version("finetune-phi", trained.registered_version)
    assert version.run_id == trained.run_id

    # the registered model is the trained model: same weights through models:/ as from the folder
    reg_model, _ = models.load(f"models:/finetune-phi/{trained.registered_version}")
    folder_model, _ = models.load(str(trained.out))
    a, b = reg_model.state_dict(), folder_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    client.set_registered_model_alias("finetune-phi", "champion", trained.registered_version)
    assert models.resolve("models:/finetune-phi@champion") == models.resolve(
        f"models:/finetune-phi/{trained.registered_version}"
    )


def test_saved_models_follow_the_umask_weights_too(trained, tiny_model):
    """safetensors writes model.safetensors through a 0600 temp file: the trained folder (checkpoints too),
    the cached tiny model and the registry's copy have the mode a plain open() gives (0666 less the umask)."""
    import os
    import stat

    from finetune_phi.files import umask_mode

    folders = [trained.out, tiny_model, models.resolve(f"models:/finetune-phi/{trained.registered_version}")]
    for folder in map(Path, folders):
        weights = list(folder.rglob("model.safetensors"))
        assert weights, folder
        wrong = {
            str(p): oct(stat.S_IMODE(os.stat(p).st_mode))
            for p in folder.rglob("*")
            if p.is_file() and stat.S_IMODE(os.stat(p).st_mode) != umask_mode()
        }
        assert not wrong, wrong


def test_lora_trains_an_adapter_and_saves_a_merged_model(trained, tmp_path):
    # LoRA on a random base barely learns; start from the briefly trained model, as a real base would be
    result = train(
        TrainConfig(
            base_model=str(trained.out),
            lora=True,
            epochs=1,
            lr=1e-3,
            batch_size=16,
            max_length=256,
            train_file=str(trained.out.parent.parent / "data" / "train.jsonl"),
            eval_file=str(trained.out.parent.parent / "data" / "test.jsonl"),
            out=str(tmp_path / "lora"),
            register=False,
        )
    )
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    merged, _ = models.load(str(tmp_path / "lora"))
    assert type(merged).__name__ == "Phi3ForCausalLM"
    assert not any("lora" in name for name in merged.state_dict())
    assert result.eval_loss < result.base_eval_loss


@pytest.mark.skipif(not (PHI3_TOKENIZER.exists() and ULTRACHAT40.exists()), reason="shared assets not present")
def test_real_ultrachat_rows_train_with_the_real_tokenizer(tmp_path):
    from finetune_phi.data.prepare import prepare

    prepare(str(ULTRACHAT40), tmp_path / "data")
    result = train(
        TrainConfig(
            base_model="tiny",
            tokenizer=str(PHI3_TOKENIZER),
            epochs=3,
            max_length=128,
            train_file=str(tmp_path / "data" / "train.jsonl"),
            eval_file=str(tmp_path / "data" / "test.jsonl"),
            out=str(tmp_path / "ft"),
            register=False,
        )
    )
    assert result.eval_loss < result.base_eval_loss - 0.5
