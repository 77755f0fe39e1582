import pytest
import torch
from support import PHI3_TOKENIZER

from finetune_phi.modeling import models


def test_tiny_is_a_real_phi3_with_the_phi3_chat_format(tiny_model):
    model, tok = models.load(str(tiny_model))
    assert type(model).__name__ == "Phi3ForCausalLM" and model.config.model_type == "phi3"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end in model.generation_config.eos_token_id  # replies stop at the end of the assistant turn
    ids = tok("Hello Paris ünïcode 😀", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Hello Paris ünïcode 😀"  # byte-level: any text round-trips


def test_tiny_build_is_deterministic(tmp_path, tiny_model):
    models.build_tiny(tmp_path / "again")
    a = models.load(str(tiny_model))[0].state_dict()
    b = models.load(str(tmp_path / "again"))[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert models.tiny_path() == tiny_model  # cached, not rebuilt


def test_model_specs_resolve_or_fail_clearly(tmp_path, tiny_model):
    assert models.resolve(str(tiny_model)) == str(tiny_model)
    assert models.resolve("microsoft/Phi-3-mini-4k-instruct") == "microsoft/Phi-3-mini-4k-instruct"
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        models.resolve("./not-there")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path))


@pytest.mark.skipif(not PHI3_TOKENIZER.exists(), reason="shared Phi-3 tokenizer not present")
def test_tiny_around_the_real_phi3_tokenizer():
    path = models.tiny_path(str(PHI3_TOKENIZER))
    model, tok = models.load(str(path))
    assert len(tok) == 32011 and model.config.vocab_size == 32064  # Phi-3-mini's padded vocabulary
    assert tok.convert_tokens_to_ids("<|end|>") == 32007
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi<|end|>\n<|assistant|>\n"


@pytest.mark.slow
def test_user_mistakes_with_models_are_one_line(tmp_path, tiny_model, capsys):
    import shutil

    from support import run_cli

    def serve_model_error(spec):
        from finetune_phi.modeling.models import load

        with pytest.raises(models.ModelNotFound) as err:
            load(spec)
        return str(err.value)

    (tmp_path / "models").mkdir()
    assert "no such model folder" in serve_model_error(str(tmp_path / "models" / "ft-typo"))
    # `models/ft-typo` looks like a hub id, but `models/` is a folder here: a local path was meant
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert "no such model folder" in serve_model_error("models/ft-typo")
    finally:
        os.chdir(cwd)
    assert "no such .gguf file" in serve_model_error(str(tmp_path / "x.gguf"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    assert "weights file is damaged or incomplete" in serve_model_error(str(broken))
    done = run_cli(capsys, "train", "--base-model", broken, "--out", tmp_path / "o")
    assert done.returncode == 2 and "damaged or incomplete" in done.stderr and "Traceback" not in done.stderr
