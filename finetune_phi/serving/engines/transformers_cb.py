"""The default engine: transformers' continuous batching on the exact weights that were trained.

transformers' ContinuousBatchingManager schedules the requests: each joins the running batch at the
next decoding step and leaves when it ends, over a paged KV cache whose full blocks are shared
between requests with the same prefix (a chat's history, resent every turn). What it lacks is kept
here, thin: per-request greedy decoding next to sampled rows, stop strings, cancellation when a
client leaves, and text streaming (generation.Row does the last three for every engine).
"""
from __future__ import annotations

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

    def __init__(self, model, tokenizer, kv_cache_tokens: int = 16_384, page_size: int = 64,
                 max_batch_tokens: int = 512):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from ...modeling.models import stop_token_ids

        context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        super().__init__(tokenizer, context, stop_token_ids(tokenizer, model.generation_config))
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
