"""Will this fine-tune fit? An estimate from the model's shape, made before any weights are loaded.

Counts weights, gradients and AdamW states of the trainable parameters, activations (Korthikanti
et al. 2022: about s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, far less with activation
checkpointing) and the fp32 logits the loss needs. It is an estimate, meant to refuse a setting
that cannot fit with a clear message instead of an out-of-memory error an hour in.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


GiB = 1024**3


@dataclass
class MemoryEstimate:
    params: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GiB:.1f}"
            for name in ("weights", "gradients", "optimizer", "activations", "logits")
        )
        return f"~{self.total / GiB:.1f} GiB ({parts} GiB; {self.params / 1e9:.2f}B params, {self.trainable / 1e6:.1f}M trainable)"


def count_params(config) -> int:
    """Parameters of a model built from its config on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def lora_params(config, r: int) -> int:
    """Trainable parameters of LoRA on every linear layer of the decoder (target_modules="all-linear")."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = h // heads
    qkv_out = (heads + 2 * kv) * head_dim
    # r * (in + out) per adapted matrix: attention qkv and output, MLP gate_up and down
    per_layer = r * (h + qkv_out) + r * (heads * head_dim + h) + r * (h + 2 * inter) + r * (inter + h)
    return per_layer * layers


def estimate(
    config,
    batch_size: int,
    seq_len: int,
    lora_r: int | None = None,
    dtype_bytes: int = 4,
    activation_checkpointing: bool = False,
    quantized_4bit: bool = False,
) -> MemoryEstimate:
    params = count_params(config)
    trainable = lora_params(config, lora_r) if lora_r else params
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    weight_bytes = 0.5 if quantized_4bit else dtype_bytes
    weights = params * weight_bytes
    # mixed precision keeps an fp32 master copy of what trains; fp32 training has it already
    master = trainable * 4 if dtype_bytes < 4 else 0
    gradients = trainable * dtype_bytes + master
    optimizer = trainable * 8  # AdamW: two fp32 moments
    s, b = seq_len, batch_size
    per_layer = s * b * h * (34 + 5 * heads * s / h) * (dtype_bytes / 2)
    activations = (
        (2 * s * b * h * dtype_bytes * layers + per_layer) if activation_checkpointing else per_layer * layers
    )
    logits = 2 * b * s * config.vocab_size * 4  # fp32 logits and their gradient
    return MemoryEstimate(params, trainable, weights, gradients, optimizer, activations, logits)


def available_bytes(device: str) -> float:
    """Memory a training process can use on the device: free GPU memory, or available RAM."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info()[0])
    import psutil

    return float(psutil.virtual_memory().available)


def check_fits(est: MemoryEstimate, device: str, headroom: float = 0.9):
    """Raise a UserError naming the numbers and the ways out when the estimate exceeds the device."""
    have = available_bytes(device) * headroom
    if est.total > have:
        raise UserError(
            f"this fine-tune needs {est.describe()}, but {device} has {have / GiB:.1f} GiB available. "
            "Try --lora (or --qlora on a GPU), a smaller --batch-size or --max-length, activation "
            "checkpointing (on by default on GPU), or more GPUs (--nproc / --target azure --nodes); "
            "--skip-memory-check runs anyway"
        )
