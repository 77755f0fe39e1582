"""Attention for continuous batching on CPU, one request at a time.

transformers' manager hands an eager/SDPA attention all the tokens of a step at once: the queries of
every request against the keys of every request, with a mask that blocks out all but each request's own
keys, and the keys first repeated for every query head (grouped-query attention). At 16 requests that is
16 times the work a request needs, plus a mask and copies of the whole batch's keys at every layer. Here
each request attends to its own keys only, through the boundaries the manager already passes for
varlen flash attention (`cu_seq_lens_q`, `cu_seq_lens_k`), with SDPA's own grouped-query support
(`enable_gqa`: no repeated keys); a prefill chunk is causal with the queries at the end of its keys.

Registered with transformers' AttentionInterface under NAME. The manager treats an implementation as
varlen (no dense mask, sequence boundaries passed) when its name says "flash", so the name does; it is
PyTorch's SDPA underneath. Used for models with plain full attention (no sliding window) on CPU; others
keep transformers' own.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


NAME = "finetune_phi_rowwise_sdpa_flash_varlen"


def rowwise_sdpa(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask=None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """query [1, heads, q tokens, dim]; key, value [1, kv heads, k tokens, dim], each request's keys in a
    contiguous run (cu_seq_lens_k). Returns [1, q tokens, heads, dim], as transformers' SDPA forward does."""
    cu_q, cu_k = kwargs["cu_seq_lens_q"].tolist(), kwargs["cu_seq_lens_k"].tolist()
    out = query.new_empty(query.shape)
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], strict=False):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        mask = None if lq == 1 else torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], attn_mask=mask, scale=scaling, enable_gqa=True
        )
    return out.transpose(1, 2).contiguous(), None


def use_for(model) -> bool:
    """Switch a model to rowwise attention when it has plain full attention on CPU; True if switched."""
    from transformers import AttentionInterface

    config = model.config
    if (
        model.device.type != "cpu"
        or getattr(config, "sliding_window", None)
        or hasattr(config, "layer_types")
        and any(t != "full_attention" for t in config.layer_types or [])
    ):
        return False
    AttentionInterface.register(NAME, rowwise_sdpa)
    # set on the config directly: set_attn_implementation() would look for a flash-attention kernel by that name
    config._attn_implementation = NAME
    return True
