"""Every setting of `finetune-phi deploy` (a managed online deployment), in one place (finetune_phi.options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from ..options import check_bounds, setting
from ..serving.engines.base import DEFAULT_ENGINE, ENGINE_NAME
from ..serving.options import parse_weights


ENDPOINT_NAME = "finetune-phi"  # the online endpoint deploy creates and delete removes, unless named
GPU_VM = "Standard_NC24ads_A100_v4"  # one A100: the tutorial's size for Phi-3-mini, training and serving
CPU_VM = "Standard_E16s_v3"  # training on CPU (compute_size cpu)
CPU_SERVING_VM = "Standard_E4s_v3"  # the quantized CPU engine (the original tutorial's serving size)


@dataclass
class DeployOptions:
    """A model behind a managed online endpoint: which model, where, on what, with which request settings."""

    BOUNDS = {
        "instance_count": (1, None),
        "max_concurrent_requests_per_instance": (1, None),
        "request_timeout_ms": (1, 180_000),
        "max_queue_wait_ms": (1, None),
    }

    model: str = field(
        metadata={"help": "job:JOB_NAME (a training job's output), a model folder, or azureml:NAME:VERSION"}
    )
    target: Literal["azure"] = setting("azure", "locally, use `finetune-phi serve`")
    endpoint_name: str = setting(ENDPOINT_NAME, "online endpoint (kept if it exists)")
    deployment_name: str = setting("ft", "deployment to create or update")
    traffic: list[str] = setting(
        [],
        "traffic after the deployment, e.g. --traffic ft=10 --traffic blue=90 (default: all to it)",
        action="extend",
        metavar="NAME=PCT",
    )
    engine: ENGINE_NAME = setting(
        DEFAULT_ENGINE,
        "what deploy/score.py serves the model with (FINETUNE_PHI_ENGINE in the deployment); "
        "openvino exports a model folder first (cached by its content)",
    )
    instance_type: str | None = setting(
        None, f"VM size of each instance (default: {CPU_SERVING_VM} for --engine openvino, else {GPU_VM})"
    )
    instance_count: int = setting(1, "instances behind the deployment")
    # Azure's request settings (OnlineRequestSettings): one request at a time per instance, as a GPU serves Phi-3
    max_concurrent_requests_per_instance: int = setting(
        1, "max_concurrent_requests_per_instance", aliases=["--max-concurrent-requests"]
    )
    request_timeout_ms: int = setting(90_000, "request_timeout_ms (Azure caps it at 180000)")
    max_queue_wait_ms: int = setting(500, "max_queue_wait_ms")
    image: str | None = setting(None, "base image of the scoring environment (default: by the VM size)")
    dry_run: bool = setting(False, "print the YAML of every entity; create nothing")
    dry_run_dir: str = setting("azure-dry-run/deploy", "where --dry-run writes the YAML")

    def __post_init__(self):
        check_bounds(self)

    @property
    def vm_size(self) -> str:
        return self.instance_type or (CPU_SERVING_VM if self.engine == "openvino" else GPU_VM)

    def traffic_split(self) -> dict[str, int]:
        """--traffic as percentages; the new deployment is created reachable by header even with no traffic."""
        try:
            split = parse_weights(self.traffic) if self.traffic else {self.deployment_name: 100}
        except ValueError as e:
            raise UserError(str(e)) from None
        split.setdefault(self.deployment_name, 0)
        return split


DEPLOY_COMMAND = (DeployOptions,)
