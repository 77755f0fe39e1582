"""The user's cache of built models (~/.cache/finetune-phi, or FINETUNE_PHI_CACHE): converted GGUF
files, the tiny model, downloads from the registry, exports. Each entry is built once, atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..files import follow_umask


def cache_dir() -> Path:
    root = (
        os.environ.get("FINETUNE_PHI_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-phi"
    )
    return Path(root)


def cached_build(name: str, key: str, build) -> Path:
    """A model folder in the cache, built once by `build(folder)` (atomically: temp dir, then rename)."""
    target = cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        follow_umask(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
