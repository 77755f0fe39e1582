"""Text generation with a loaded model: inference parameters, stop strings, cancellation."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


class ParamError(ValueError):
    """An inference parameter the caller got wrong (the endpoint answers 400)."""


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
    def parse(cls, raw: dict | None, **defaults) -> "GenerationParams":
        """Build from request params, checking types and ranges. Unknown keys are an error, not ignored."""
        raw = dict(raw or {})
        if "max_tokens" in raw and "max_new_tokens" not in raw:  # OpenAI's name
            raw["max_new_tokens"] = raw.pop("max_tokens")
        p = cls(**defaults)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ParamError(f"unknown parameter(s) {unknown}; supported: {sorted(known)}")
        for key, value in raw.items():
            setattr(p, key, value)
        if type(p.max_new_tokens) is not int or not 1 <= p.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise ParamError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_CAP}, got {p.max_new_tokens!r}")
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


class Generator:
    """One model and its tokenizer; generate() calls run one at a time (the model is not re-entrant)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tok = tokenizer
        self.lock = threading.Lock()
        self.context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompt: str, params: GenerationParams, cancel: threading.Event | None = None) -> str:
        """The continuation of `prompt` (or prompt + continuation when return_full_text)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        n_prompt = ids["input_ids"].shape[1]
        if n_prompt + params.max_new_tokens > self.context_length:
            raise ParamError(f"prompt has {n_prompt} tokens; with max_new_tokens={params.max_new_tokens} that "
                             f"exceeds the model's context of {self.context_length} tokens")

        class Stop(StoppingCriteria):  # a cancelled request (timeout, disconnect) frees the model early
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool(cancel and cancel.is_set()), device=input_ids.device)

        sampling = dict(temperature=float(params.temperature), top_p=float(params.top_p)) if params.do_sample else {}
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                **ids, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample, **sampling,
                stop_strings=params.stop or None, tokenizer=self.tok if params.stop else None,
                stopping_criteria=StoppingCriteriaList([Stop()]), pad_token_id=self.tok.pad_token_id)
        text = self.tok.decode(out[0, n_prompt:], skip_special_tokens=True)
        for s in params.stop:  # stop strings end generation but HF keeps them in the output
            if s in text:
                text = text[: text.index(s)]
        return prompt + text if params.return_full_text else text.strip()

    def chat(self, messages: list[dict], params: GenerationParams, cancel: threading.Event | None = None) -> str:
        """The assistant's reply to a conversation, through the model's chat template."""
        params.return_full_text = False
        return self.generate(self.chat_prompt(messages), params, cancel)
