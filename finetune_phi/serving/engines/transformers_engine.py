"""The default engine: transformers' continuous batching on the exact weights that were trained.

transformers' ContinuousBatchingManager schedules the requests: each joins the running batch at the
next decoding step and leaves when it ends, over a paged KV cache whose full blocks are shared
between requests with the same prefix (a chat's history, resent every turn). What it lacks is kept
here, thin: per-request greedy decoding next to sampled rows, JSON grammars for response_format rows
in the same batch, stop strings, cancellation when a client leaves, and text streaming (generation.DecodeRequest
does the last three for every engine).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import threading
from concurrent.futures import Future

from ...modeling import models
from ...modeling.models import stop_token_ids
from ..generation import DecodeRequest, ParamError
from ..options import KV_CACHE_TOKENS
from . import rowwise_attention
from .base import Engine


# Sampling is one switch for the whole manager, so greedy rows sample at a temperature so low that
# the softmax is one-hot on the argmax: the same token as argmax unless two logits are exactly tied.
GREEDY_TEMPERATURE = 1e-10


class TransformersEngine(Engine):
    name = "transformers"
    # response_format: rows held to a JSON grammar by xgrammar inside the batch (_mask_by_grammar), when installed
    constrains = importlib.util.find_spec("xgrammar") is not None

    def __init__(
        self,
        model,
        tokenizer,
        kv_cache_tokens: int = KV_CACHE_TOKENS,
        page_size: int = 64,
        max_batch_tokens: int = 2048,
    ):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        super().__init__(tokenizer, context, stop_token_ids(tokenizer, model.generation_config))
        self.model = model
        # admission: a row starts when the tokens it may hold (prompt + max_new_tokens) fit beside the rows in
        # flight; until then it waits, unstarted (the endpoint's max_queue_wait_ms withdraws it: 408)
        self.page_size = page_size
        self.kv_cache_tokens = max(kv_cache_tokens // page_size, 1) * page_size  # whole pages, as the manager has
        self._reserved: dict[str, int] = {}  # request id -> tokens it may hold
        self._waiting: collections.deque = collections.deque()  # (row, future) in arrival order
        self._admit_lock = threading.Lock()
        self._grammars = (
            _Grammars(tokenizer, model.config.vocab_size, sorted(self.stop_ids)) if self.constrains else None
        )
        # Temperature and top_p must differ from 1.0 here for transformers to create their per-request
        # processors; every request then passes its own values.
        generation_config = GenerationConfig(
            do_sample=True, temperature=0.7, top_p=0.99, top_k=0, eos_token_id=sorted(self.stop_ids)
        )
        # On CPU the manager sizes its cache from free RAM (gigabytes); a token budget keeps it to what
        # the requests need. Pages of 64 tokens let chat turns share most of their history.
        # Attention one request at a time (rowwise_attention) where the model allows: the manager's own SDPA
        # path attends every request to the whole batch's keys through a mask
        rowwise = rowwise_attention.use_for(model)
        config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=self.kv_cache_tokens // page_size,
            max_batch_tokens=max_batch_tokens,
            per_request_processors=True,
            allow_block_sharing=True,
            **(dict(max_blocks_per_request=0, use_async_batching=False) if rowwise else {}),
        )
        self.manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=config
        )
        _sort_only_where_needed(self.manager)
        if self.constrains:
            _mask_by_grammar(self.manager, self._row)
        # Started from a daemon thread so that its generation thread is a daemon too (threads inherit it):
        # a process that never calls close() (Azure's inference server on SIGTERM) can still exit.
        starter = threading.Thread(target=self.manager.start, daemon=True)
        starter.start()
        starter.join()
        self.dispatcher = threading.Thread(target=self._dispatch, name="engine-results", daemon=True)
        self.dispatcher.start()

    @classmethod
    def load(cls, spec: str, **options) -> TransformersEngine:
        return cls(*models.load(spec), **options)

    def submit(self, row: DecodeRequest) -> Future:
        if row.params.response_format:  # held to its grammar inside the batch (_mask_by_grammar)
            row.grammar = self._grammars.matcher(row.params.response_format)
        future: Future = Future()
        with self._admit_lock:
            self._waiting.append((row, future))
        self._admit()
        return future

    def _tokens(self, row: DecodeRequest) -> int:
        """The KV cache a row may take: its prompt and max_new_tokens, in whole pages."""
        return -(-(len(row.prompt_ids) + row.params.max_new_tokens) // self.page_size) * self.page_size

    def token_limits(self) -> list[tuple[int, str, str]]:
        return super().token_limits() + [(self.kv_cache_tokens, "the engine's KV cache", " (--kv-cache-tokens)")]

    def _admit(self):
        """Start waiting rows, in order, while their pages fit in the KV cache beside those in flight (encode
        refuses a row larger than the whole cache). A row withdrawn while waiting (future cancelled) is skipped."""
        while True:
            with self._admit_lock:
                if not self._waiting:
                    return
                row, future = self._waiting[0]
                in_flight = sum(self._reserved.values())
                if future.cancelled():
                    self._waiting.popleft()
                    continue
                if in_flight + self._tokens(row) > self.kv_cache_tokens:
                    return  # the head waits for room; rows behind it wait their turn (no overtaking)
                self._waiting.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                request_id = f"r{next(self._ids)}"
                self._reserved[request_id] = self._tokens(row)
            self._start(row, future, request_id)

    def _start(self, row: DecodeRequest, future: Future, request_id: str):
        self._track(row, future, request_id=request_id)
        p = row.params
        temperature, top_p = p.sampling or (GREEDY_TEMPERATURE, 1.0)
        self.manager.add_request(
            row.prompt_ids,
            request_id=request_id,
            max_new_tokens=p.max_new_tokens,
            streaming=row.needs_each_token,
            eos_token_id=sorted(self.stop_ids),
            temperature=temperature,
            top_p=top_p,
        )

    def _release(self, request_id: str):
        with self._admit_lock:
            self._reserved.pop(request_id, None)
        self._admit()

    def _end(self, request_id: str, reason: str):
        super()._end(request_id, reason)
        self._release(request_id)

    def _fail(self, request_id: str, error: Exception):
        super()._fail(request_id, error)
        self._release(request_id)

    def _dispatch(self):
        """Route the manager's outputs to their rows; cancel rows whose client left or that hit a stop string."""
        while not self.closed:
            output = self.manager.get_result(timeout=0.05)
            if output is not None:
                self._deliver(output)
            elif (error := self.manager.background_thread_status.fatal_error) is not None:
                self._fail_all(RuntimeError(f"the generation loop stopped: {error}"))
            for rid, row, _, _ in self._tracked():
                if row.cancel.is_set():
                    self.manager.cancel_request(rid)
                    self._end(rid, "cancelled")

    def _deliver(self, output):
        row = self._row(output.request_id)
        if row is None:
            return  # a row we already ended (cancelled, stop string)
        if output.error is not None:
            self._fail(output.request_id, RuntimeError(f"generation failed: {output.error}"))
            return
        new = output.generated_tokens[len(row.ids) :]
        if row.add(new, self.decode, self.stop_ids):
            if not output.is_finished():
                self.manager.cancel_request(output.request_id)  # a stop string: no more tokens wanted
            self._end(output.request_id, row.finish_reason)
        elif output.is_finished():
            self._end(output.request_id, "length")

    def close(self):
        self.closed = True
        self.manager.stop(block=True, timeout=10)
        error = RuntimeError("the engine was closed")
        with self._admit_lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for _, future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._fail_all(error)


def _sort_only_where_needed(manager):
    """Swap the manager's per-request top-p warper for RowTopP (before it starts: the batch processor and the
    model runner read the same processor list)."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingTopPLogitsWarper,
    )

    processors = manager.logit_processor.logits_processor
    for i, processor in enumerate(processors):
        if type(processor) is ContinuousBatchingTopPLogitsWarper:
            processors[i] = _row_top_p(processor)


def _row_top_p(stock):
    """A top-p warper that sorts the vocabulary only for the rows that ask for top_p < 1.

    The stock per-request warper sorts all 49k logits of every row at every step, although greedy rows
    (sent with top_p 1) and rows sampled at the default top_p 1 keep every token: on 2 cores that sort was
    most of the difference between our decoding and a greedy manager's. Rows with top_p < 1 get the stock
    warper's own arithmetic, so their distribution is unchanged. On CUDA the stock warper runs as is (a
    data-dependent row selection would break graph capture)."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingTopPLogitsWarper,
    )

    class RowTopP(ContinuousBatchingTopPLogitsWarper):
        def __init__(self):  # the stock warper's settings (top_p default, filter value, min tokens)
            self.__dict__.update(stock.__dict__)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if scores.is_cuda:
                return super().__call__(scores, tensor_arg)
            top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
            rows = (top_p < 1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                return scores
            if rows.numel() == scores.size(0):
                return super().__call__(scores, tensor_arg)
            scores = scores.clone()
            scores[rows] = super().__call__(scores[rows], tensor_arg[: scores.size(0)][rows])
            return scores

    return RowTopP()


class _Grammars:
    """response_format -> a fresh xgrammar GrammarMatcher (xgrammar: the grammar library vLLM and SGLang use),
    each grammar compiled once. json_object is an object, as OpenAI's is (xgrammar's builtin JSON grammar also
    allows "[1]"); compact (no free whitespace): a small model held to a grammar otherwise indents until
    max_tokens. The matcher lets a stop token through once the JSON is complete."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.compiled: dict[str, object] = {}
        self.lock = threading.Lock()

    def matcher(self, response_format: dict):
        key = json.dumps(response_format, sort_keys=True)
        with self.lock:
            if key not in self.compiled:
                schema = {"type": "object"} if response_format["type"] == "json_object" else response_format["schema"]
                try:
                    self.compiled[key] = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
                except Exception as e:  # a schema xgrammar cannot compile: the caller's 400
                    raise ParamError(f"response_format: the JSON schema cannot be used: {e}") from None
            return self.xgr.GrammarMatcher(self.compiled[key])


def _mask_by_grammar(manager, row_of):
    """Put a grammar mask first in the manager's logits processors (before temperature and top-p, as generate()
    orders them): rows with a response_format get xgrammar's token bitmask, the others nothing. The manager
    gives a per-request processor the requests of each step in the order of the logits rows; the mask reads
    each request's row (its matcher), feeds the matcher the tokens it has not seen yet and fills that row's
    bitmask, so constrained rows decode in the same batch as free ones and cost a bitmask each."""
    import torch
    import xgrammar
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
    )

    vocab_size = manager.model.config.vocab_size

    class GrammarMask(ContinuousBatchingLogitsProcessor):
        supported_kwargs: dict = {}
        ignored_kwargs: tuple = ()

        def __init__(self):
            self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(-1)  # -1: a free row

        def prepare_tensor_args(self, requests) -> torch.Tensor:
            slots, filled = [], 0
            for request in requests:
                row = row_of(request.state.request_id)
                matcher = getattr(row, "grammar", None)
                if matcher is None:
                    slots.append(-1)
                    continue
                generated = request.state.generated_tokens
                for token in generated[row.grammar_seen :]:  # what the batch chose since the last step
                    if not matcher.is_terminated():
                        matcher.accept_token(token)
                row.grammar_seen = len(generated)
                if filled == self.bitmask.size(0):
                    self.bitmask = torch.cat([self.bitmask, xgrammar.allocate_token_bitmask(filled, vocab_size)])
                matcher.fill_next_token_bitmask(self.bitmask, filled)
                slots.append(filled)
                filled += 1
            return torch.tensor(slots, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            slots = tensor_arg[: scores.size(0)]
            rows = (slots >= 0).nonzero().squeeze(-1)
            if rows.numel() == 0:
                return scores
            masked = scores[rows]
            xgrammar.apply_token_bitmask_inplace(
                masked, self.bitmask[slots[rows].long()].to(masked.device), vocab_size=scores.size(-1)
            )
            scores = scores.clone()
            scores[rows] = masked
            return scores

    processors = manager.logit_processor
    processors.logits_processor.insert(0, GrammarMask())
    processors.tensors_required += 1
    processors._retrieve_processors_kwargs()
    processors.do_processing = True
