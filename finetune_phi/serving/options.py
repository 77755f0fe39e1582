"""Every setting of `finetune-phi serve`, in one place (as training/config.py is for train).

`Limits` are the endpoint's request settings, named as Azure ML's OnlineRequestSettings; `ServeOptions`
the rest: deployments, traffic, address, engine. Each field is a flag, a key of `serve --config FILE`, and
what the endpoint reads (finetune_phi.options).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..options import check_bounds, setting
from .engines.base import DEFAULT_ENGINE, ENGINE_NAME
from .generation import MAX_NEW_TOKENS_CAP


DEFAULT_DEPLOYMENT = "default=tiny"  # without --deployment
HOST, PORT = "127.0.0.1", 5000  # where the local endpoint listens unless told
SCORING_URI = f"http://{HOST}:{PORT}/score"
KV_CACHE_TOKENS = 16_384  # the transformers engine's KV cache without --kv-cache-tokens


@dataclass
class Limits:
    """Request settings, named as in Azure ML's OnlineRequestSettings.

    request_timeout_ms is Azure's maximum (its default is 5,000): on CPU a long answer from a busy
    model takes minutes, and cutting it off only wastes the work already done. Capacity is bounded by
    max_concurrent_requests_per_instance (429 above it), not by the clock. max_queue_wait_ms bounds
    the wait before decoding starts (a request waits while the engine's KV cache is full).
    """

    _argument_group_name = "request limits (Azure ML's OnlineRequestSettings)"
    BOUNDS = {
        "max_concurrent_requests_per_instance": (1, None),
        "max_queue_wait_ms": (1, None),
        "request_timeout_ms": (1, None),
        "max_body_bytes": (1, None),
        "max_new_tokens_cap": (1, None),
    }

    max_concurrent_requests_per_instance: int = setting(
        32, "requests in flight at once; more get 429", aliases=["--max-concurrent-requests"]
    )
    max_queue_wait_ms: int = setting(5_000, "longest wait before decoding starts; then 408")
    request_timeout_ms: int = setting(
        180_000, "longest request; then 503 (Azure ML's maximum: CPU answers can take minutes)"
    )
    max_body_bytes: int = setting(1_000_000, "larger request bodies get 413")
    max_new_tokens_cap: int = setting(MAX_NEW_TOKENS_CAP, "largest max_new_tokens / max_tokens accepted")

    def __post_init__(self):
        check_bounds(self)


@dataclass
class ServeOptions:
    """What the local endpoint serves, where, and with which engine."""

    BOUNDS = {"port": (1, 65535), "kv_cache_tokens": (16, None)}

    deployment: list[str] = setting(
        [],
        f"a deployment NAME=MODEL: MODEL is tiny, smollm2-135m, a folder or models:/NAME/VERSION (repeat; "
        f"default {DEFAULT_DEPLOYMENT})",
        action="extend",
        metavar="NAME=MODEL",
    )
    traffic: list[str] = setting(
        [],
        "traffic split in percent, summing to 100 (repeat; default: all to the first deployment)",
        action="extend",
        metavar="NAME=PCT",
    )
    host: str = setting(HOST, "address to listen on")
    port: int = setting(PORT, "port to listen on")
    engine: ENGINE_NAME = setting(
        DEFAULT_ENGINE,
        "what decodes: transformers (continuous batching, CPU or GPU), vllm (CUDA GPU), openvino "
        "(int8 on CPU, exported on first use); see docs/serving.md",
    )
    kv_cache_tokens: int | None = setting(
        None,
        f"the transformers engine's KV cache in tokens (default {KV_CACHE_TOKENS}): a request starts when its "
        "prompt and max_new_tokens fit beside those decoding, else waits (408 after --max-queue-wait-ms)",
    )

    def __post_init__(self):
        check_bounds(self)

    def deployments(self) -> dict[str, str]:
        try:
            return parse_pairs(self.deployment or [DEFAULT_DEPLOYMENT], "deployment")
        except ValueError as e:
            raise UserError(str(e)) from None

    def traffic_split(self) -> dict[str, int]:
        try:
            return parse_traffic(self.traffic, list(self.deployments()))
        except ValueError as e:
            raise UserError(str(e)) from None

    def engine_options(self) -> dict:
        """What the engine is built with (only the settings its own)."""
        if self.kv_cache_tokens is None:
            return {}
        if self.engine != "transformers":
            raise UserError(f"--kv-cache-tokens sizes the transformers engine's cache, not the {self.engine} engine's")
        return {"kv_cache_tokens": self.kv_cache_tokens}


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """NAME=VALUE flags -> dict, with an error naming the bad flag."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--{what} {item!r}: expected NAME=VALUE")
        if name in pairs:
            raise ValueError(f"--{what}: {name!r} given twice")
        pairs[name] = value
    return pairs


def parse_weights(items: list[str]) -> dict[str, int]:
    """--traffic NAME=PCT ... -> {name: pct}, percentages that add up to 100 (Azure ML's rule too)."""
    traffic = {}
    for name, pct in parse_pairs(items, "traffic").items():
        if not pct.isdigit() or not 0 <= int(pct) <= 100:
            raise ValueError(f"--traffic {name}={pct}: percentage must be an integer from 0 to 100")
        traffic[name] = int(pct)
    if sum(traffic.values()) != 100:
        raise ValueError(f"--traffic percentages must add up to 100, got {sum(traffic.values())}")
    return traffic


def parse_traffic(items: list[str], deployments: list[str]) -> dict[str, int]:
    """Weights for the local endpoint's deployments; none given -> all to the first deployment."""
    if not items:
        return {name: (100 if i == 0 else 0) for i, name in enumerate(deployments)}
    traffic = parse_weights(items)
    unknown = sorted(set(traffic) - set(deployments))
    if unknown:
        raise ValueError(f"--traffic names no deployment {unknown} (have {deployments})")
    return {name: traffic.get(name, 0) for name in deployments}


SERVE_COMMAND = (ServeOptions, Limits)  # the dataclasses behind `finetune-phi serve`
