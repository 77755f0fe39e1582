"""What a generation request asks for and what it gets: parameters, the request's running state, the result.

The engines (engines/) decode; this module is the part of a request every engine shares: checking
the parameters a client sent, and turning generated token ids into text that stops where the
request says (stop tokens, stop strings, max_new_tokens, cancellation) and streams as it settles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


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
    # OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}; None = free text
    response_format: dict | None = None

    @classmethod
    def parse(cls, raw: dict | None, cap: int = MAX_NEW_TOKENS_CAP, **defaults) -> GenerationParams:
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
        if (
            isinstance(p.temperature, bool)
            or not isinstance(p.temperature, (int, float))
            or not 0 <= p.temperature <= 2
        ):
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
        p.response_format = _response_format(p.response_format)
        if p.temperature == 0:
            p.do_sample = False  # temperature 0 means greedy, as OpenAI and Azure ML read it
        return p

    @property
    def sampling(self) -> tuple[float, float] | None:
        """(temperature, top_p) to sample with, or None to decode greedily: the one reading of do_sample and
        temperature 0 that every engine uses."""
        return (float(self.temperature), float(self.top_p)) if self.do_sample and self.temperature > 0 else None


def _response_format(value) -> dict | None:
    """OpenAI's response_format, checked: None for free text, else json_object or json_schema with a schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema") if isinstance(value.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise ParamError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return {"type": "json_schema", "schema": schema}
    raise ParamError(f'response_format must be {{"type": "text" | "json_object" | "json_schema"}}, got {value!r}')


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class DecodeRequest:
    """One request as an engine decodes it: the prompt, its settings, and the text so far.

    Engines only produce token ids; add() turns them into text, applies the request's stop
    tokens, stop strings and max_new_tokens, and streams what is settled. Every engine shares it,
    so a request ends the same way whichever engine serves it.
    """

    prompt_ids: list[int]
    params: GenerationParams
    cancel: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    # filled while decoding
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    grammar: object = None  # response_format: the engine's grammar matcher for this row
    grammar_seen: int = 0  # tokens the matcher has been fed

    @property
    def needs_each_token(self) -> bool:
        """Whether the text must be followed token by token (to stream it or to find a stop string)."""
        return bool(self.params.stop or self.on_text)

    def add(self, tokens: list[int], decode: Callable[[list[int]], str], stop_ids: set[int]) -> bool:
        """Take newly generated tokens; True once the row is finished (stop token, stop string, length, cancel)."""
        for token in tokens:
            if self.finish_reason:
                break
            if self.cancel.is_set():
                self.finish_reason = "cancelled"
            elif token in stop_ids:
                self.finish_reason = "stop"
            else:
                self.ids.append(token)
                if self.needs_each_token:
                    self._settle(decode)
                if self.finish_reason is None and len(self.ids) >= self.params.max_new_tokens:
                    self.finish_reason = "length"
        if self.finish_reason and not self.needs_each_token:
            self.text = decode(self.ids)  # once at the end, not once per token
        self._emit(final=self.finish_reason is not None)
        return self.finish_reason is not None

    def finish(self, reason: str, decode: Callable[[list[int]], str]) -> Completion:
        """End the row (if the engine ended it first, e.g. at its own length limit) and give its Completion."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.text = decode(self.ids)
            for s in self.params.stop:  # an engine that ran on without us watching (no streaming)
                if s in self.text:
                    self.text = self.text[: self.text.index(s)]
        self._emit(final=True)
        return Completion(self.text, self.finish_reason, len(self.prompt_ids), len(self.ids))

    def _settle(self, decode):
        self.text = decode(self.ids)
        for s in self.params.stop:
            if s in self.text:
                self.text = self.text[: self.text.index(s)]
                self.finish_reason = "stop"
                break

    def _emit(self, final: bool):
        """Stream the text that is settled: no half UTF-8 character, nothing that may start a stop string."""
        if self.on_text is None:
            return
        upto = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                return
            upto -= max((len(s) - 1 for s in self.params.stop), default=0)
        if upto > self.sent:
            self.on_text(self.text[self.sent : upto])
            self.sent = upto
