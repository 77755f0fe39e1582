"""OpenVINO GenAI on CPU: int8 (or int4/fp16/fp32) weights with continuous batching.

Serves a folder made by `finetune-phi export --format openvino` (OpenVINO IR plus the source's Hugging
Face tokenizer files), or any model spec (a fine-tuned folder, models:/..., smollm2-135m), exported on first
use into the user's cache and kept, keyed by the model's content. OpenVINO GenAI's ContinuousBatchingPipeline schedules the requests: each joins
the running batch at the next step and leaves when it ends, over a paged KV cache (prefix caching on,
so a chat's resent history is not recomputed). One worker thread owns the pipeline: it adds the
submitted rows, runs a step, and hands each row its new tokens (generation.DecodeRequest does stop strings,
cancellation and streaming, as for every engine).

Needs `pip install 'finetune-phi[openvino]'` (openvino-genai); without it choosing the engine is a clear
error (EngineUnavailable), never a silent fall back.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from pathlib import Path

from ...modeling import export
from ..generation import DecodeRequest
from .base import Engine, EngineUnavailable


log = logging.getLogger("finetune_phi.serving.engines")
INT8 = export.DEFAULT_PRECISION["openvino"]


def _require_openvino():
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        raise EngineUnavailable(
            "--engine openvino needs OpenVINO GenAI: pip install 'finetune-phi[openvino]' (openvino-genai)"
        ) from None


def exported_folder(spec: str, precision: str = INT8) -> Path:
    """The exported folder for a spec: the spec itself when it is an export, else its export, made on first use
    into the cache (keyed by the model's content; finetune_phi.modeling.export.cached_export), with a progress line."""
    log.info("--engine openvino: finding or making the OpenVINO %s export of %s", precision, spec)
    return export.cached_export(spec, "openvino", precision, progress=lambda line: log.info("%s", line))


class OpenVINOEngine(Engine):
    name = "openvino"

    def __init__(
        self,
        path: Path,
        tokenizer,
        context_length: int,
        stop_ids: list[int],
        *,
        precision: str = INT8,
        threads: int | None = None,
        kv_cache_gb: float = 1.0,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 2048,
        prefix_caching: bool = True,
    ):
        import openvino_genai as ov_genai

        super().__init__(tokenizer, context_length, stop_ids)
        self.path, self.precision = path, precision
        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = max(1, int(round(kv_cache_gb)))  # GB of KV cache
        scheduler.max_num_seqs = max_num_seqs
        scheduler.max_num_batched_tokens = max_batch_tokens
        scheduler.dynamic_split_fuse = True  # long prompts are prefilled in chunks between decoding steps
        scheduler.enable_prefix_caching = prefix_caching
        props: dict = {}
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        if precision in ("fp32", "fp16"):
            # exact: the CPU plugin otherwise computes in bf16 (AVX512-BF16) and keeps the KV cache in u8
            props.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32", DYNAMIC_QUANTIZATION_GROUP_SIZE=0)
        self.pipe = ov_genai.ContinuousBatchingPipeline(str(path), scheduler, "CPU", props)
        self._ov_genai = ov_genai
        self.inbox: queue.Queue = queue.Queue()  # submitted rows, taken in by the worker between steps
        self.worker = threading.Thread(target=self._loop, name="openvino-engine", daemon=True)
        self.worker.start()

    @classmethod
    def load(cls, spec: str, **options) -> OpenVINOEngine:
        _require_openvino()
        path = exported_folder(spec, options.get("precision") or INT8)
        options.setdefault("precision", export.read_manifest(path).get("precision", INT8))
        return cls(path, *cls.describe(str(path)), **options)

    def _config(self, row: DecodeRequest):
        p = row.params
        c = self._ov_genai.GenerationConfig()
        c.max_new_tokens = p.max_new_tokens
        c.stop_token_ids = set(self.stop_ids)
        c.do_sample = p.sampling is not None
        if c.do_sample:
            c.temperature, c.top_p = p.sampling
        return c

    def submit(self, row: DecodeRequest) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()  # it joins the running batch at the next step
        if self.closed:
            future.set_exception(RuntimeError("the engine was closed"))
            return future
        self.inbox.put((row, future))
        return future

    def _loop(self):
        import numpy as np
        import openvino as ov

        while True:
            try:
                # block while idle; while decoding, take what arrived so it joins at the next step
                item = self.inbox.get() if not self._rows else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            try:
                while item is not None:
                    if item is _STOP:
                        return
                    row, future = item
                    rid = next(self._ids)
                    handle = self.pipe.add_request(
                        rid, ov.Tensor(np.array([row.prompt_ids], dtype=np.int64)), self._config(row)
                    )
                    self._track(row, future, handle, request_id=rid)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self.pipe.has_non_finished_requests():
                    self.pipe.step()
                self._collect()
            except Exception as e:  # a failed step fails its rows; the engine goes on
                log.exception("OpenVINO generation step failed")
                self._cancel(self._fail_all(RuntimeError(f"generation failed: {e}")))

    def _collect(self):
        """Hand each row its new tokens; end the rows that finished, hit a stop string or were cancelled."""
        status = self._ov_genai.GenerationStatus
        for rid, row, _, handle in self._tracked():
            if row.cancel.is_set():
                handle.cancel()
                self._end(rid, "cancelled")
                continue
            new: list[int] = []
            while handle.can_read():
                for output in handle.read().values():
                    new.extend(output.generated_ids)
            state = handle.get_status()
            if new and row.add(new, self.decode, self.stop_ids):
                if state == status.RUNNING:
                    handle.cancel()  # a stop string or stop id: no more tokens wanted
                self._end(rid, row.finish_reason)
            elif state == status.IGNORED:
                self._fail(rid, RuntimeError("the request did not fit the KV cache (kv_cache_gb)"))
            elif state != status.RUNNING:
                # the pipeline ended it first: at max_new_tokens, or at a stop id it left out of the output
                self._end(rid, "length" if len(row.ids) >= row.params.max_new_tokens else "stop")

    @staticmethod
    def _cancel(handles):
        for handle in handles:
            try:
                handle.cancel()
            except Exception:  # the pipeline may already have dropped it
                pass

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.inbox.put(_STOP)
        self.worker.join(timeout=10)
        self._cancel(self._fail_all(RuntimeError("the engine was closed")))
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and not item[1].done():
                item[1].set_exception(RuntimeError("the engine was closed"))


_STOP = object()
