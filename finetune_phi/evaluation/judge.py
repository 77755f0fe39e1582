"""A pairwise judge: a strong chat model says which of two answers is better, in both orders.

The protocol is MT-Bench's pairwise comparison (FastChat llm_judge), as Arena-Hard plays it: each
paired line is judged twice with the answers swapped; the judge explains, then ends its reply with
`[[A]]`, `[[B]]` or `[[C]]` (a tie). A reply without a verdict is a parse failure (counted, never a
tie); two orders that disagree make a tie. The candidate's win rate is (wins + ties / 2) / judged
lines, with a paired bootstrap 95% interval over lines; position consistency, the rate at which the
first slot wins and a length-controlled win rate (AlpacaEval 2's minimal form) say how far to trust it.

The judge is any OpenAI-compatible chat completions API, named by a Prompt flow connection: `open_ai`
(api_key, base_url: OpenAI, or any server such as `finetune-phi serve`) or `azure_open_ai` (api_base,
api_key or Entra ID through azure-identity, api_version). Calls go through the endpoint client's retry
policy (serving.client.RetryPolicy) and are cached by (judge, model, prompt) under the user's cache,
so a re-run of the same comparison asks the judge nothing. Standard library (and numpy for the
statistics) only: the flows' tools import it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.cache import cache_dir
from ..serving.client import EndpointError, RetryPolicy, post_json
from .report import paired_bootstrap


SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below, in the context of the conversation before it. A reference answer is "
    "given: use it to check the responses, not as the only good answer. Choose the assistant that follows the "
    "user's instructions and answers the user's question better, considering helpfulness, relevance, accuracy, "
    "depth and level of detail. Begin your evaluation by comparing the two responses and provide a short "
    "explanation. Avoid any position biases and ensure that the order in which the responses were presented "
    "does not influence your decision. Do not allow the length of the responses to influence your evaluation. "
    "Be as objective as possible. After providing your explanation, output your final verdict by strictly "
    'following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)

VERDICT = re.compile(r"\[\[([ABC])\]\]")
AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"


class JudgeError(EndpointError):
    """The judge could not be asked (a connection of another type, no model name): one line."""


@dataclass
class Judge:
    """Where the judge's chat completions API is and how to authenticate; `model` is what it is asked for."""

    url: str  # the chat completions URL
    model: str
    headers: dict = field(repr=False, default_factory=dict)
    kind: str = "open_ai"
    max_tokens: int = 1024  # the longest reply: an explanation, then the verdict

    @classmethod
    def from_connection(cls, connection, model: str | None = None) -> Judge:
        """From a Prompt flow OpenAIConnection / AzureOpenAIConnection (or an object with the same fields)."""
        kind = type(connection).__name__
        if hasattr(connection, "api_base") and ("Azure" in kind or getattr(connection, "api_type", "") == "azure"):
            if not model:
                raise JudgeError("an azure_open_ai judge needs --judge-model: the name of its Azure OpenAI deployment")
            base = connection.api_base.rstrip("/")
            version = getattr(connection, "api_version", None) or "2024-10-21"
            url = f"{base}/openai/deployments/{urllib.parse.quote(model)}/chat/completions?api-version={version}"
            if getattr(connection, "api_key", None) and getattr(connection, "auth_mode", "key") != "meid_token":
                headers = {"api-key": connection.api_key}
            else:  # Entra ID: a token for Azure OpenAI from azure-identity (az login, managed identity, ...)
                from azure.identity import DefaultAzureCredential

                token = DefaultAzureCredential().get_token(AZURE_SCOPE).token
                headers = {"Authorization": f"Bearer {token}"}
            return cls(url, model, headers, "azure_open_ai")
        if not hasattr(connection, "api_key"):
            raise JudgeError(f"a judge connection is of type open_ai or azure_open_ai, not {kind}")
        base = (getattr(connection, "base_url", None) or "https://api.openai.com/v1").rstrip("/")
        headers = {"Authorization": f"Bearer {connection.api_key}"}
        if getattr(connection, "organization", None):
            headers["OpenAI-Organization"] = connection.organization
        return cls(base + "/chat/completions", model or "gpt-4o", headers)

    def ask(self, messages: list[dict], retry: RetryPolicy | None = None, timeout: float = 300) -> str:
        """The judge's reply (temperature 0), from the cache when this exact prompt was asked before."""
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}

        def read(response):
            with response:
                try:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    raise EndpointError(f"{self.url} answered something that is not a chat completion") from None

        return cached(
            [self.url, self.model, self.max_tokens, messages],
            "reply",
            {"model": self.model},
            lambda: post_json(self.url, "", body, None, timeout, read, retry, headers=self.headers),
        )


def _cache_dir() -> Path:
    return cache_dir() / "judge"


def cached(key: list, field: str, about: dict, compute, folder: str = ""):
    """What the judge answered for `key` (judge, model, prompt ...), from <cache>/judge[/folder] when it was asked
    before, else compute() written there atomically as {**about, field: value}: a re-run asks nothing again."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = _cache_dir() / folder / digest[:2] / f"{digest}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))[field]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**about, field: value}), encoding="utf-8")
    os.replace(tmp, path)
    return value


def prompt(
    question: str, chat_history: list | None, reference: str | None, answer_a: str, answer_b: str
) -> list[dict]:
    """The judge's messages for one game: the conversation so far, the question, the reference, answers A and B."""
    turns = "".join(
        f"[User]\n{t['inputs']['question']}\n\n[Assistant]\n{t['outputs']['answer']}\n\n" for t in chat_history or []
    )
    history = (
        f"[The Start of the Conversation So Far]\n{turns}[The End of the Conversation So Far]\n\n" if turns else ""
    )
    ref = f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n" if reference else ""
    user = (
        f"{history}[User Question]\n{question}\n\n{ref}"
        f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
        f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> str | None:
    """ "A", "B" or "C" from the last [[X]] of the reply; None (a parse failure) if it has none."""
    found = VERDICT.findall(reply or "")
    return found[-1] if found else None


def judge_pair(
    judge: Judge,
    question: str,
    chat_history: list | None,
    reference: str | None,
    base: str,
    candidate: str,
    retry: RetryPolicy | None = None,
) -> dict:
    """Both games of one paired line. Game 1 puts the base in slot A, game 2 the candidate. The line's
    outcome for the candidate: "win", "loss", "tie" (a [[C]], or two orders that disagree), or None
    when either reply had no verdict (a parse failure)."""
    replies = [
        judge.ask(prompt(question, chat_history, reference, base, candidate), retry),
        judge.ask(prompt(question, chat_history, reference, candidate, base), retry),
    ]
    verdicts = [parse_verdict(r) for r in replies]
    result, consistent = outcome(*verdicts)
    return {
        "outcome": result,
        "verdict_1": verdicts[0],
        "verdict_2": verdicts[1],
        "reason_1": replies[0],
        "reason_2": replies[1],
        "consistent": consistent,
        "length_delta": float(len((candidate or "").split()) - len((base or "").split())),
    }


def outcome(verdict_1: str | None, verdict_2: str | None) -> tuple[str | None, bool | None]:
    """(the candidate's outcome, whether the two orders agreed) from the verdicts of game 1 (base in slot
    A) and game 2 (candidate in slot A): "win", "loss", "tie" (a [[C]], or orders that disagree), or
    (None, None) when either game has no verdict."""
    games = [
        {"B": "win", "A": "loss", "C": "tie"}.get(verdict_1),
        {"A": "win", "B": "loss", "C": "tie"}.get(verdict_2),
    ]
    if None in games:
        return None, None
    return (games[0] if games[0] == games[1] else "tie"), games[0] == games[1]


def summarize(results: list[dict], length_deltas: list[float], model: str, seed: int = 0) -> dict:
    """The `judge` object of summary.json from the lines' judge_pair results (paired lines only, in order)
    and each line's answer-length difference (candidate - base, in words)."""
    verdicts = [
        tuple(v if v in ("A", "B", "C") else None for v in (r.get("verdict_1"), r.get("verdict_2"))) for r in results
    ]
    judged = [(o, d) for v, d in zip(verdicts, length_deltas, strict=True) if (o := outcome(*v))[0] is not None]
    score = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    values = [score[o] for (o, _), _ in judged]
    games = [v for pair in verdicts for v in pair if v is not None]
    win_rate, lo, hi = paired_bootstrap(values, seed=seed) if values else (None, None, None)
    return {
        "model": model,
        "n": len(judged),
        "wins": sum(o == "win" for (o, _), _ in judged),
        "losses": sum(o == "loss" for (o, _), _ in judged),
        "ties": sum(o == "tie" for (o, _), _ in judged),
        "win_rate": win_rate,
        "ci_low": lo,
        "ci_high": hi,
        "position_consistency": (sum(c for (_, c), _ in judged) / len(judged)) if judged else None,
        "first_slot_rate": (games.count("A") / len(games)) if games else None,
        "parse_failures": sum(v is None for pair in verdicts for v in pair),
        "lc_win_rate": length_controlled(values, [d for _, d in judged]) if values else None,
    }


def length_controlled(
    values: list[float], length_deltas: list[float], iterations: int = 100, slope_penalty: float = 1.0
) -> float:
    """AlpacaEval 2's minimal length control: a logistic regression of the preference (1 win, 0.5 tie,
    0 loss) on tanh(length difference / its standard deviation), read where the lengths are equal:
    sigmoid(intercept). Fitted by Newton's method on the soft labels, with an L2 penalty on the slope
    (a standard-normal prior): when every answer of the candidate is longer, Δlength = 0 lies outside
    the data and the unpenalised fit would extrapolate to 0 or 1. Equals the win rate when the lengths
    do not explain the preference."""
    import numpy as np

    y = np.asarray(values, dtype=float)
    d = np.asarray(length_deltas, dtype=float)
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.column_stack([np.ones_like(x), x])
    penalty = np.diag([1e-6, slope_penalty])  # a whisper on the intercept: all-win data stays finite
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-X @ w))
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, X.T @ (y - p) - penalty @ w)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))
