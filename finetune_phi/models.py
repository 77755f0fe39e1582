"""Base models: the offline `tiny` Phi-3, hub ids, local folders and registry URIs, all as HF folders.

`tiny` is a randomly initialised model with the real Phi-3 architecture (Phi3Config, a few small
layers) and a Phi-3-style tokenizer: the Phi-3 chat template and special tokens around a small
byte-level BPE trained on the project's own offline sample, or around a real tokenizer when one is
given (`--tokenizer PATH`). It is built deterministically once and cached.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

# The Phi-3 chat template (microsoft/Phi-3-mini-4k-instruct). TRAINING_TEMPLATE renders the same
# text but marks assistant turns with {% generation %} so TRL can compute loss on them alone.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n'}}"
    "{% generation %}{{message['content'] + '<|end|>\n'}}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
DEFAULT_HUB_MODEL = "microsoft/Phi-3-mini-4k-instruct"

# Sizes of the tiny model; part of the cache key, so changing them builds a new one.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=4096)
TINY_VERSION = "1"  # bump when the build recipe changes


def cache_dir() -> Path:
    root = os.environ.get("FINETUNE_PHI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-phi"
    return Path(root)


def build_tokenizer(tokenizer_path: str | None = None):
    """A Phi-3-style tokenizer: the real one from a path, or a small BPE trained on the offline sample."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer_path:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from .sample import generate_sample

        texts = [m["content"] for row in generate_sample(2000, seed=1234) for m in row["messages"]]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=PHI3_SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(texts, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>",
                                      unk_token="<unk>", pad_token="<|endoftext|>")
    missing = [t for t in ("<|user|>", "<|assistant|>", "<|end|>") if t not in tok.get_vocab()]
    if missing:
        raise ValueError(f"{tokenizer_path}: not a Phi-3 tokenizer, it lacks the special tokens {missing}")
    tok.chat_template = PHI3_CHAT_TEMPLATE
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
    config = Phi3Config(vocab_size=vocab, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **TINY_SHAPE)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def stop_token_ids(tok) -> list[int]:
    """Generation stops at the end of the assistant turn (<|end|>) or the end of text."""
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def tiny_path(tokenizer_path: str | None = None) -> Path:
    """The cached tiny model folder, built on first use (atomically: build in a temp dir, rename)."""
    key = f"{TINY_VERSION}|{sorted(TINY_SHAPE.items())}"
    if tokenizer_path:
        key += "|" + hashlib.sha256(Path(tokenizer_path, "tokenizer.json").read_bytes()).hexdigest()
    target = cache_dir() / f"tiny-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny(tmp, tokenizer_path)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(spec: str, tokenizer_path: str | None = None) -> str:
    """Turn a model spec into something `from_pretrained` takes: a local folder or a hub id.

    tiny -> the cached tiny model; models:/NAME/VERSION or models:/NAME@ALIAS -> the registered
    model, downloaded from MLflow; an existing folder -> itself; anything else -> a hub id.
    """
    if spec == "tiny":
        return str(tiny_path(tokenizer_path))
    if spec.startswith("models:/"):
        from .registry import download_model

        return str(download_model(spec))
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise FileNotFoundError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return spec
    if spec.startswith((".", "/")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec}: no such model folder")
    return spec  # a hub id such as microsoft/Phi-3-mini-4k-instruct


def load(spec: str, device: str | None = None):
    """(model, tokenizer) ready for inference: bf16 on GPU, fp32 on CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok
