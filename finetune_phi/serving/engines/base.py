"""The engine interface and the registry of engines (`--engine NAME`)."""

from __future__ import annotations

import importlib
import itertools
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Literal

from ...errors import UserError
from ...modeling.models import stop_token_ids
from ..chat_template import chat_token_ids
from ..generation import (
    Completion,
    ContextLengthError,
    DecodeRequest,
    GenerationParams,
    ParamError,
)


# name -> "module:class", imported only when chosen (each engine pulls in its own heavy library)
ENGINES = {
    "transformers": "finetune_phi.serving.engines.transformers_engine:TransformersEngine",
    "vllm": "finetune_phi.serving.engines.vllm_engine:VLLMEngine",
    "openvino": "finetune_phi.serving.engines.openvino_engine:OpenVINOEngine",
}
DEFAULT_ENGINE = "transformers"
ENGINE_NAME = Literal[tuple(ENGINES)]  # the type of an --engine setting


class EngineUnavailable(UserError):
    """The chosen engine cannot run here (library not installed, no GPU): never silently replaced by another."""


class Engine(ABC):
    """One model, decoding many requests at once.

    submit(row) returns a Future that is running once decoding of the row has started (until then
    `future.cancel()` withdraws it) and ends with the row's Completion. Setting `row.cancel` stops a
    started row at its next token; `row.on_text` receives the text as it settles (streaming).
    """

    name = "engine"
    constrains = False  # can it hold an answer to a grammar (response_format json_object / json_schema)?

    def __init__(self, tokenizer, context_length: int, stop_ids: list[int]):
        self.tok = tokenizer
        self.context_length = context_length
        self.stop_ids = set(stop_ids)
        self.closed = False
        # the rows being decoded: request id -> (row, future, the engine's own handle or None)
        self._rows: dict[str, tuple[DecodeRequest, Future, object]] = {}
        self._rows_lock = threading.Lock()
        self._ids = itertools.count()

    @staticmethod
    def describe(path: str) -> tuple[object, int, list[int]]:
        """(tokenizer, context length, stop ids) of a model folder, for engines that load the weights themselves."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a folder without generation_config.json
            generation_config = None
        context = getattr(config, "max_position_embeddings", None) or tok.model_max_length
        return tok, context, stop_token_ids(tok, generation_config)

    # ---- the table of rows being decoded, for engines that route their library's outputs to rows

    def _track(self, row: DecodeRequest, future: Future, handle: object = None, request_id=None):
        """Register a row being decoded under a new request id (or the one given); returns the id."""
        request_id = f"r{next(self._ids)}" if request_id is None else request_id
        with self._rows_lock:
            self._rows[request_id] = (row, future, handle)
        return request_id

    def _tracked(self) -> list[tuple[str, DecodeRequest, Future, object]]:
        with self._rows_lock:
            return [(rid, *entry) for rid, entry in self._rows.items()]

    def _row(self, request_id: str) -> DecodeRequest | None:
        with self._rows_lock:
            entry = self._rows.get(request_id)
        return entry[0] if entry else None

    def _end(self, request_id: str, reason: str):
        """Finish a row with its Completion (once: a row already ended is ignored)."""
        with self._rows_lock:
            entry = self._rows.pop(request_id, None)
        if entry is not None:
            row, future, _ = entry
            future.set_result(row.finish(reason, self.decode))

    def _fail(self, request_id: str, error: Exception):
        with self._rows_lock:
            entry = self._rows.pop(request_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(error)

    def _fail_all(self, error: Exception) -> list[object]:
        """Fail every row; returns their handles (for the engine to cancel)."""
        with self._rows_lock:
            entries, self._rows = list(self._rows.values()), {}
        for _, future, _ in entries:
            if not future.done():
                future.set_exception(error)
        return [handle for _, _, handle in entries if handle is not None]

    def chat_prompt(self, messages: list[dict]) -> str:
        """The chat template's text for messages (to read; `encode(messages)` is what the model gets)."""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str | list[dict], params: GenerationParams) -> list[int]:
        """Token ids of a prompt (text, tokenized as is) or of chat messages (their content kept as text: see
        chat_template); ContextLengthError if it and the answer cannot fit the context."""
        if params.response_format and not self.constrains:  # refused, never accepted and ignored
            raise ParamError(
                f"response_format {params.response_format['type']}: the {self.name} engine cannot constrain "
                "its answers (the transformers engine can, with xgrammar installed: `make install`)"
            )
        if isinstance(prompt, str):
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = chat_token_ids(self.tok, prompt)
        if not ids:
            raise ParamError("the prompt is empty")
        for limit, what, setting in self.token_limits():
            if len(ids) + params.max_new_tokens > limit:
                raise ContextLengthError(
                    f"prompt has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"that exceeds {what} of {limit} tokens{setting}"
                )
        return ids

    def token_limits(self) -> list[tuple[int, str, str]]:
        """(tokens, what holds them, the setting that sizes it) that a prompt and its answer must fit: the model's
        context, and what an engine adds (its KV cache)."""
        return [(self.context_length, "the model's context", "")]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @abstractmethod
    def submit(self, row: DecodeRequest) -> Future:
        """Start decoding a row; the Future's result is its Completion."""

    def run(self, rows: list[DecodeRequest]) -> list[Completion]:
        """Completions for rows, waiting in this thread (the scoring script's synchronous path)."""
        futures = [self.submit(r) for r in rows]
        return [f.result() for f in futures]

    def close(self):  # noqa: B027 - optional: an engine without background work has nothing to stop
        """Stop background work; pending futures fail."""


def load_engine(name: str, spec: str, **options) -> Engine:
    """The engine `name` serving the model `spec` (tiny, smollm2-135m, a folder, models:/...)."""
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls).load(spec, **options)
