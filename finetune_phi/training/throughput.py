"""Training throughput figures: padding waste of a collated batch and model FLOPs utilisation."""

from __future__ import annotations


# dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def padding_waste(batch) -> tuple[int, int]:
    """(padding positions, all positions) in one collated batch.

    A padded batch marks padding with attention_mask == 0. A padding-free batch (packed rows told
    apart by position_ids, no attention_mask) has no padding at all.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return 0, int(ids.numel())
    return int((mask == 0).sum()), int(mask.numel())


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in BF16_PEAK.items() if key in device_name), None)


def mfu(params: int, tokens_per_second: float, device_peak: float) -> float:
    """Model FLOPs utilisation: 6 FLOPs per parameter per trained token (forward + backward) over the peak."""
    return 6 * params * tokens_per_second / device_peak
