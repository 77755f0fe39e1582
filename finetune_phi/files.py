"""Files the project writes: their modes follow the user's umask, as a plain open() would; their checksums.

Temp files are made 0600 (`tempfile.mkstemp`, and safetensors writes `model.safetensors` through one), so a
file renamed into place, or saved by a library that way, would be readable by its owner only, and a re-run
would turn a 0664 set into 0600. These put the mode a new file would have had.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def umask_mode() -> int:
    """The mode a plain open() gives a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def follow_umask(folder: str | Path) -> None:
    """Give every file under a folder the project wrote (a saved model, its checkpoints) the umask's mode."""
    mode = umask_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)


def sha256(path: str | Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
