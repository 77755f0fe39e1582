"""Checkpoints: whether one would load on resume, and which one a `--resume` run continues from."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


def checkpoint_problem(path: Path) -> str | None:
    """Why resuming from this checkpoint would fail, or None when everything it needs loads.

    A process killed mid-save or a full disk leaves files cut short; Trainer only finds out by
    crashing (`PytorchStreamReader failed reading zip archive`). Each file is opened the way resuming
    opens it, but cheaply: safetensors headers (which state how long the file must be) and torch
    files memory-mapped, so no tensor data is read.
    """
    try:
        json.loads((path / "trainer_state.json").read_text())  # Trainer writes it last
    except (OSError, ValueError) as e:
        return f"trainer_state.json is missing or unreadable ({reason(e)})"
    weights = [
        path / f
        for f in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
        if (path / f).exists()
    ]
    index = path / "model.safetensors.index.json"
    if index.exists():  # a sharded model: every shard the index names
        try:
            weights += [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as e:
            return f"{index.name} is unreadable ({reason(e)})"
    if not weights:
        return "it has no model weights"
    for f in weights + [path / "optimizer.pt", path / "scheduler.pt"]:
        if not f.exists():
            return f"{f.name} is missing"
        if problem := _unloadable(f):
            return f"{f.name} does not load ({problem})"
    for f in path.glob("rng_state*.pth"):  # numpy state inside: weights_only refuses it, so check the zip only
        try:
            zipfile.ZipFile(f).close()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{f.name} does not load ({reason(e)})"
    return None


def _unloadable(f: Path) -> str | None:
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt"):
                pass
        else:
            import torch

            torch.load(f, map_location="cpu", weights_only=True, mmap=True)  # as Trainer loads it, less the data
    except Exception as e:  # whatever the reader says is the reason to skip the file
        return reason(e)
    return None


def reason(e: BaseException) -> str:
    """The first sentence of an error: torch's go on for a paragraph."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].split(". ")[0]


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint-N that loads; a half-written or damaged one is skipped, saying why."""
    found = sorted(
        (p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"--resume: skipping incomplete checkpoint {path}: {problem}")
    return None


def checkpoint_to_resume(ckpt_dir: Path) -> Path | None:
    last = latest_complete_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if last is not None:
        step = json.loads((last / "trainer_state.json").read_text()).get("global_step")
        print(f"--resume: resuming from {last} (step {step})")
    return last
