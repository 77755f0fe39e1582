"""The engine interface and the registry of engines (`--engine NAME`)."""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from concurrent.futures import Future

from ..errors import UserError
from ..generation import Completion, ContextLengthError, GenerationParams, ParamError, Row

# name -> "module:class", imported only when chosen (each engine pulls in its own heavy library)
ENGINES = {
    "transformers": "finetune_phi.engines.transformers_cb:TransformersEngine",
    "vllm": "finetune_phi.engines.vllm_engine:VLLMEngine",
    "openvino": "finetune_phi.engines.openvino_engine:OpenVINOEngine",
}
DEFAULT_ENGINE = "transformers"


class EngineUnavailable(UserError):
    """The chosen engine cannot run here (library not installed, no GPU): never silently replaced by another."""


class Engine(ABC):
    """One model, decoding many requests at once.

    submit(row) returns a Future that is running once decoding of the row has started (until then
    `future.cancel()` withdraws it) and ends with the row's Completion. Setting `row.cancel` stops a
    started row at its next token; `row.on_text` receives the text as it settles (streaming).
    """

    name = "engine"

    def __init__(self, tokenizer, context_length: int, stop_ids: list[int]):
        self.tok = tokenizer
        self.context_length = context_length
        self.stop_ids = set(stop_ids)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str, params: GenerationParams) -> list[int]:
        """Token ids of a prompt; ContextLengthError if it and the answer cannot fit the context."""
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ParamError("the prompt is empty")
        if len(ids) + params.max_new_tokens > self.context_length:
            raise ContextLengthError(f"prompt has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} that "
                                     f"exceeds the model's context of {self.context_length} tokens")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @abstractmethod
    def submit(self, row: Row) -> Future:
        """Start decoding a row; the Future's result is its Completion."""

    def run(self, rows: list[Row]) -> list[Completion]:
        """Completions for rows, waiting in this thread (the scoring script's synchronous path)."""
        futures = [self.submit(r) for r in rows]
        return [f.result() for f in futures]

    def close(self):
        """Stop background work; pending futures fail."""


def load_engine(name: str, spec: str, **options) -> Engine:
    """The engine `name` serving the model `spec` (tiny, smollm2-135m, a folder, models:/...)."""
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls).load(spec, **options)
