"""vLLM on a CUDA GPU: its own continuous batching, paged attention and prefix caching.

Needs `pip install vllm` and a CUDA GPU; without either, choosing it is an error (EngineUnavailable),
never a silent fall back to another engine. vLLM's AsyncLLM runs on an event loop in a thread of
its own, so submit() works from any thread like the other engines'.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from ...modeling import models
from ..generation import DecodeRequest
from .base import Engine, EngineUnavailable


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise EngineUnavailable("--engine vllm needs vLLM: pip install vllm (on a machine with a CUDA GPU)") from None
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailable("--engine vllm needs a CUDA GPU and none is visible; use --engine transformers here")


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self, path: str, tokenizer, context_length: int, stop_ids: list[int], gpu_memory_utilization: float = 0.85
    ):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        super().__init__(tokenizer, context_length, stop_ids)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.thread.start()
        args = AsyncEngineArgs(
            model=path,
            dtype="bfloat16",
            enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=context_length,
        )
        self.llm = asyncio.run_coroutine_threadsafe(self._create(AsyncLLM, args), self.loop).result()

    @staticmethod
    async def _create(AsyncLLM, args):
        return AsyncLLM.from_engine_args(args)

    @classmethod
    def load(cls, spec: str, **options) -> VLLMEngine:
        _require_vllm()

        path = models.resolve(spec)
        return cls(path, *cls.describe(path), **options)

    def submit(self, row: DecodeRequest) -> Future:
        return asyncio.run_coroutine_threadsafe(self._generate(row), self.loop)

    async def _generate(self, row: DecodeRequest):
        from vllm import SamplingParams

        p = row.params
        temperature, top_p = p.sampling or (0.0, 1.0)  # vLLM decodes greedily at temperature 0
        sampling = SamplingParams(
            max_tokens=p.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=sorted(self.stop_ids),
            skip_special_tokens=True,
        )
        request_id, reason = f"r{next(self._ids)}", "length"
        async for output in self.llm.generate({"prompt_token_ids": row.prompt_ids}, sampling, request_id):
            tokens = list(output.outputs[0].token_ids)
            if row.add(tokens[len(row.ids) :], self.decode, self.stop_ids):
                if not output.finished:
                    await self.llm.abort(request_id)  # a stop string or a client gone: no more tokens wanted
                break
            if output.finished:  # vLLM stopped first (its stop ids are ours; it leaves the stop token out)
                reason = "stop" if output.outputs[0].finish_reason == "stop" else "length"
        return row.finish(reason, self.decode)

    def close(self):
        self.llm.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
