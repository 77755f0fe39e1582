"""Azure AI Evaluation's AI-assisted quality evaluators (coherence, fluency, relevance, similarity) on both
answers of a paired line, asked of the comparison's judge model.

Each evaluator is azure-ai-evaluation's own (its prompty, its parsing, its 1-5 scale), given the judge as
the model configuration it takes: `OpenAIModelConfiguration` (base_url, api_key, model) for an `open_ai`
connection, `AzureOpenAIModelConfiguration` (endpoint, deployment, api_version, key or Entra ID) for an
`azure_open_ai` one. A score is cached under the judge's cache by (judge, model, evaluator, inputs), so a
re-run of a comparison asks nothing again; a reply the evaluator cannot read gives no score (None),
counted per evaluator, never a number made up.
"""

from __future__ import annotations

import math
import urllib.parse

from .judge import Judge, JudgeError, cached


# name -> (azure.ai.evaluation class, the inputs it takes of query / response / ground_truth)
EVALUATORS = {
    "coherence": ("CoherenceEvaluator", ("query", "response")),
    "fluency": ("FluencyEvaluator", ("response",)),
    "relevance": ("RelevanceEvaluator", ("query", "response")),
    "similarity": ("SimilarityEvaluator", ("query", "response", "ground_truth")),
}


def parse_names(text: str | list | tuple | None) -> tuple[str, ...]:
    """`coherence,fluency` (or a list) -> the evaluator names, checked; JudgeError naming an unknown one."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text or []) if n.strip()]
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise JudgeError(f"unknown judge evaluator {', '.join(unknown)}: choose from {', '.join(EVALUATORS)}")
    return tuple(dict.fromkeys(names))


class _Token:
    """An Entra ID token already obtained (judge.Judge asked azure-identity for it), as a credential."""

    def __init__(self, token: str):
        self._token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, 2**31 - 1)


def model_config(judge: Judge) -> tuple[dict, object | None]:
    """(azure-ai-evaluation's model configuration for the judge, an Entra ID credential or None)."""
    bearer = judge.headers.get("Authorization", "").removeprefix("Bearer ")
    if judge.kind == "azure_open_ai":
        url = urllib.parse.urlsplit(judge.url)
        config = {
            "type": "azure_openai",
            "azure_endpoint": f"{url.scheme}://{url.netloc}",
            "azure_deployment": judge.model,
            "api_version": urllib.parse.parse_qs(url.query).get("api-version", ["2024-10-21"])[0],
        }
        if "api-key" in judge.headers:
            return config | {"api_key": judge.headers["api-key"]}, None
        return config, _Token(bearer)
    return {
        "type": "openai",
        "base_url": judge.url.removesuffix("/chat/completions"),
        "api_key": bearer,
        "model": judge.model,
    }, None


_evaluators: dict = {}


def _evaluator(judge: Judge, name: str):
    key = (judge.url, judge.model, name)
    if key not in _evaluators:
        import azure.ai.evaluation as evaluation  # slow import: only when an evaluator is asked for

        config, credential = model_config(judge)
        _evaluators[key] = getattr(evaluation, EVALUATORS[name][0])(config, credential=credential)
    return _evaluators[key]


def score(judge: Judge, name: str, query: str, response: str, ground_truth: str = "") -> float | None:
    """One evaluator's 1-5 score of one answer (None when the judge's reply had no score), cached."""
    inputs = {"query": query, "response": response, "ground_truth": ground_truth}
    inputs = {k: inputs[k] for k in EVALUATORS[name][1]}

    def ask():
        try:
            value = _evaluator(judge, name)(**inputs).get(name)
        except ValueError:  # the evaluator could not read the judge's reply (not JSON): no score, not a failed line
            return None
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    return cached(
        [judge.url, judge.model, name, inputs],
        "score",
        {"evaluator": name, "model": judge.model},
        ask,
        folder="evaluators",
    )


def score_pair(judge: Judge, names, question: str, ground_truth: str, base: str, candidate: str) -> dict:
    """{"base": {name: score}, "candidate": {name: score}} for the evaluators named (empty when none are)."""
    names = parse_names(names)
    if not names:
        return {}
    return {
        side: {n: score(judge, n, question, answer or "", ground_truth or "") for n in names}
        for side, answer in (("base", base), ("candidate", candidate))
    }
