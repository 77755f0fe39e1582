"""The default engine: transformers' continuous batching on the exact weights that were trained.

transformers' ContinuousBatchingManager schedules the requests: each joins the running batch at the
next decoding step and leaves when it ends, over a paged KV cache whose full blocks are shared
between requests with the same prefix (a chat's history, resent every turn). What it lacks is kept
here, thin: per-request greedy decoding next to sampled rows, stop strings, cancellation when a
client leaves, and text streaming (generation.Row does the last three for every engine).
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from concurrent.futures import Future

from ..generation import Row
from .base import Engine

log = logging.getLogger("finetune_phi.serving.engines")

# Sampling is one switch for the whole manager, so greedy rows sample at a temperature so low that
# the softmax is one-hot on the argmax: the same token as argmax unless two logits are exactly tied.
GREEDY_TEMPERATURE = 1e-10


class TransformersEngine(Engine):
    name = "transformers"
    # response_format: rows held to a JSON grammar by xgrammar (_Constrained below), when it is installed
    constrains = importlib.util.find_spec("xgrammar") is not None

    def __init__(self, model, tokenizer, kv_cache_tokens: int = 16_384, page_size: int = 64,
                 max_batch_tokens: int = 512):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from ...modeling.models import stop_token_ids

        context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        super().__init__(tokenizer, context, stop_token_ids(tokenizer, model.generation_config))
        self.model = model
        self._constrained = None  # made on the first response_format request
        # Temperature and top_p must differ from 1.0 here for transformers to create their per-request
        # processors; every request then passes its own values.
        generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.99, top_k=0,
                                             eos_token_id=sorted(self.stop_ids))
        # On CPU the manager sizes its cache from free RAM (gigabytes); a token budget keeps it to what
        # the requests need. Pages of 64 tokens let chat turns share most of their history.
        config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=max(kv_cache_tokens // page_size, 1), max_batch_tokens=max_batch_tokens,
            per_request_processors=True, allow_block_sharing=True)
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=config)
        _sort_only_where_needed(self.manager)
        # Started from a daemon thread so that its generation thread is a daemon too (threads inherit it):
        # a process that never calls close() (Azure's inference server on SIGTERM) can still exit.
        starter = threading.Thread(target=self.manager.start, daemon=True)
        starter.start()
        starter.join()
        self.dispatcher = threading.Thread(target=self._dispatch, name="engine-results", daemon=True)
        self.dispatcher.start()

    @classmethod
    def load(cls, spec: str, **options) -> "TransformersEngine":
        from ...modeling import models

        return cls(*models.load(spec), **options)

    def submit(self, row: Row) -> Future:
        if row.params.response_format:  # the manager has no grammar hook: these rows decode beside it
            if self._constrained is None:
                self._constrained = _Constrained(self)
            return self._constrained.submit(row)
        future: Future = Future()
        future.set_running_or_notify_cancel()  # the manager schedules it at once: it never waits for a batch to drain
        request_id = self._track(row, future)
        p = row.params
        self.manager.add_request(
            row.prompt_ids, request_id=request_id, max_new_tokens=p.max_new_tokens,
            streaming=row.needs_each_token, eos_token_id=sorted(self.stop_ids),
            temperature=float(p.temperature) if p.do_sample else GREEDY_TEMPERATURE,
            top_p=float(p.top_p) if p.do_sample else 1.0)
        return future

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
        new = output.generated_tokens[len(row.ids):]
        if row.add(new, self.decode, self.stop_ids):
            if not output.is_finished():
                self.manager.cancel_request(output.request_id)  # a stop string: no more tokens wanted
            self._end(output.request_id, row.finish_reason)
        elif output.is_finished():
            self._end(output.request_id, "length")

    def close(self):
        self.closed = True
        self.manager.stop(block=True, timeout=10)
        self._fail_all(RuntimeError("the engine was closed"))


def _sort_only_where_needed(manager):
    """Swap the manager's per-request top-p warper for RowTopP (before it starts: the batch processor and the
    model runner read the same processor list)."""
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingTopPLogitsWarper

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
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingTopPLogitsWarper

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


class _Constrained:
    """Rows whose answer must follow a JSON grammar (response_format json_object / json_schema), decoded one
    at a time with `model.generate` on the same weights, beside the manager's batch, through xgrammar's
    logits processor (the grammar library vLLM and SGLang use): a token bitmask applied to these rows only,
    so free rows pay nothing. Grammars are compiled once per schema. The row's own settings, stop ids,
    cancellation and streaming apply as on the manager's rows (Row.add is called token by token)."""

    def __init__(self, engine: TransformersEngine):
        from concurrent.futures import ThreadPoolExecutor

        import xgrammar

        self.engine, self.xgr = engine, xgrammar
        vocab = engine.model.config.vocab_size
        self.compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(engine.tok, vocab_size=vocab))
        self.grammars: dict[str, object] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="constrained")

    def grammar(self, response_format: dict):
        import json

        key = json.dumps(response_format, sort_keys=True)
        if key not in self.grammars:
            # json_object is an object, as OpenAI's is (xgrammar's builtin JSON grammar also allows "[1]"); compact
            # (no free whitespace): a small model held to a grammar otherwise indents until max_tokens
            schema = {"type": "object"} if response_format["type"] == "json_object" else response_format["schema"]
            self.grammars[key] = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return self.grammars[key]

    def submit(self, row: Row) -> Future:
        future: Future = Future()
        self.pool.submit(self._run, row, future)
        return future

    def _run(self, row: Row, future: Future):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if not future.set_running_or_notify_cancel():  # withdrawn while queued (max_queue_wait_ms)
            return
        engine = self.engine
        request_id = engine._track(row, future)

        class Follow(StoppingCriteria):  # each new token into the row: stop ids, stop strings, length, cancel
            def __call__(self, input_ids, scores, **kwargs):
                done = row.add([int(input_ids[0, -1])], engine.decode, engine.stop_ids)
                return torch.tensor([done], dtype=torch.bool, device=input_ids.device)

        p = row.params
        sampling = dict(do_sample=True, temperature=float(p.temperature), top_p=float(p.top_p), top_k=0) if p.do_sample \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            processor = self.xgr.contrib.hf.LogitsProcessor(self.grammar(p.response_format))
            with torch.inference_mode():
                engine.model.generate(
                    torch.tensor([row.prompt_ids], device=engine.model.device), max_new_tokens=p.max_new_tokens + 1,
                    eos_token_id=sorted(engine.stop_ids), pad_token_id=sorted(engine.stop_ids)[0],
                    logits_processor=[processor], stopping_criteria=StoppingCriteriaList([Follow()]), **sampling)
            engine._end(request_id, row.finish_reason or "length")
        except Exception as e:  # a schema xgrammar cannot compile, or a failure while decoding: this row only
            log.warning("constrained decoding failed: %s", e)
            engine._fail(request_id, RuntimeError(f"constrained decoding failed: {e}"))
