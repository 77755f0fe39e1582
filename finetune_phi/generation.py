"""Text generation: inference parameters and a batched decoding loop with per-request settings.

One loop serves every path (a single request, a batch of concurrent ones, streaming): prompts are
left-padded into one batch, prefilled once, then decoded a token at a time with a KV cache. Each
row keeps its own temperature, top_p, max_new_tokens, stop strings and cancellation, so requests
with different settings can share a batch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable


class ParamError(ValueError):
    """An inference parameter the caller got wrong (the endpoint answers 400)."""


class ContextLengthError(ParamError):
    """The prompt and the tokens asked for do not fit the model's context."""


MAX_NEW_TOKENS_CAP = 1024


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    do_sample: bool = True
    return_full_text: bool = True  # MLflow/HF pipeline default for the text-generation shape
    stop: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: dict | None, cap: int = MAX_NEW_TOKENS_CAP, **defaults) -> "GenerationParams":
        """Build from request params, checking types and ranges. Unknown keys are an error, not ignored;
        a null value means the default (the OpenAI API allows null for every optional parameter)."""
        if raw is not None and not isinstance(raw, dict):
            raise ParamError(f"parameters must be a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw or {}) - known - {"max_tokens"})
        if unknown:
            raise ParamError(f"unknown parameter(s) {unknown}; supported: {sorted(known)}")
        raw = {key: value for key, value in (raw or {}).items() if value is not None}
        if "max_tokens" in raw:  # OpenAI's name
            if "max_new_tokens" in raw:
                raise ParamError("give max_new_tokens or max_tokens, not both")
            raw["max_new_tokens"] = raw.pop("max_tokens")
        p = cls(**defaults)
        p.max_new_tokens = min(p.max_new_tokens, cap)  # a server's lower cap lowers the default too
        for key, value in raw.items():
            setattr(p, key, value)
        if type(p.max_new_tokens) is not int or not 1 <= p.max_new_tokens <= cap:
            raise ParamError(f"max_new_tokens must be an integer from 1 to {cap}, got {p.max_new_tokens!r}")
        if isinstance(p.temperature, bool) or not isinstance(p.temperature, (int, float)) or not 0 <= p.temperature <= 2:
            raise ParamError(f"temperature must be a number from 0 to 2, got {p.temperature!r}")
        if isinstance(p.top_p, bool) or not isinstance(p.top_p, (int, float)) or not 0 < p.top_p <= 1:
            raise ParamError(f"top_p must be a number in (0, 1], got {p.top_p!r}")
        for name in ("do_sample", "return_full_text"):
            if not isinstance(getattr(p, name), bool):
                raise ParamError(f"{name} must be true or false, got {getattr(p, name)!r}")
        if isinstance(p.stop, str):
            p.stop = [p.stop]
        if not isinstance(p.stop, list) or not all(isinstance(s, str) and s for s in p.stop) or len(p.stop) > 4:
            raise ParamError("stop must be a non-empty string or a list of at most 4 of them")
        if p.temperature == 0:
            p.do_sample = False  # temperature 0 means greedy, as OpenAI and Azure ML read it
        return p


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Row:
    """One request inside a batch."""
    prompt_ids: list[int]
    params: GenerationParams
    cancel: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    # filled while decoding
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None


class Generator:
    """One model and its tokenizer; run() decodes one batch at a time (the model is not re-entrant)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tok = tokenizer
        self.lock = threading.Lock()
        self.context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids.add(tokenizer.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

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

    def run(self, rows: list[Row]) -> list[Completion]:
        """Decode a batch of rows to completion; each row stops on its own conditions."""
        import torch

        with self.lock, torch.inference_mode():
            self._decode(rows)
        return [Completion(r.text, r.finish_reason or "stop", len(r.prompt_ids), len(r.ids)) for r in rows]

    def _decode(self, rows: list[Row]):
        import torch
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token lands in the last column
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        temps = torch.tensor([[r.params.temperature if r.params.do_sample else 1.0] for r in rows], device=device)
        top_ps = torch.tensor([[float(r.params.top_p)] for r in rows], device=device)
        greedy = torch.tensor([not r.params.do_sample for r in rows], device=device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1)
        for _ in range(max(r.params.max_new_tokens for r in rows)):
            next_ids = self._sample(out.logits[:, -1, :].float(), temps, top_ps, greedy)
            for r, token in zip(rows, next_ids.tolist()):
                if r.finish_reason is None:
                    self._advance(r, token)
            if all(r.finish_reason for r in rows):
                break
            next_ids = torch.tensor([[self.pad_id if r.finish_reason else r.ids[-1]] for r in rows], device=device)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=next_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        for r in rows:
            r.finish_reason = r.finish_reason or "length"
            if not (r.params.stop or r.on_text):
                r.text = self.tok.decode(r.ids, skip_special_tokens=True)  # once, not once per token
            self._emit(r, final=True)

    @staticmethod
    def _sample(logits, temps, top_ps, greedy):
        import torch

        probs = torch.softmax(logits / temps.clamp(min=1e-5), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_ps  # nucleus: keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        picked = order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
        return torch.where(greedy, logits.argmax(-1), picked)

    def _advance(self, r: Row, token: int):
        if r.cancel.is_set():
            r.finish_reason = "cancelled"
            return
        if token in self.stop_ids:
            r.finish_reason = "stop"
            return
        r.ids.append(token)
        if r.params.stop or r.on_text:  # text is needed while decoding only to stream or find stop strings
            r.text = self.tok.decode(r.ids, skip_special_tokens=True)
        for s in r.params.stop:
            if s in r.text:
                r.text = r.text[: r.text.index(s)]
                r.finish_reason = "stop"
                break
        if r.finish_reason is None and len(r.ids) >= r.params.max_new_tokens:
            r.finish_reason = "length"
        self._emit(r, final=r.finish_reason is not None)

    @staticmethod
    def _emit(r: Row, final: bool):
        """Stream the text that is settled: no half UTF-8 character, nothing that may start a stop string."""
        if r.on_text is None:
            return
        upto = len(r.text)
        if not final:
            if r.text.endswith("\ufffd"):
                return
            upto -= max((len(s) - 1 for s in r.params.stop), default=0)
        if upto > r.sent:
            r.on_text(r.text[r.sent:upto])
            r.sent = upto
