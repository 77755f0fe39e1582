"""Inference engines behind one interface (Engine): the endpoint, the Azure ML scoring script and the
benchmark hand an engine Rows and get Completions; which library decodes is a deployment's choice.

    transformers  the exact weights that were trained, on CPU or GPU, with continuous batching (default)
    vllm          vLLM on a CUDA GPU, when vllm is installed
"""

from .base import ENGINES, Engine, EngineUnavailable, load_engine


__all__ = ["ENGINES", "Engine", "EngineUnavailable", "load_engine"]
