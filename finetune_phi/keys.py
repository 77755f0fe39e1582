"""The endpoint's API key: from FINETUNE_PHI_API_KEY, or generated once into a 0600 file outside the repo."""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "FINETUNE_PHI_API_KEY"


def key_file() -> Path:
    root = os.environ.get("FINETUNE_PHI_CONFIG") or Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "finetune-phi"
    return Path(root) / "api_key"


def get_or_create_key(env_var: str = KEY_ENV) -> tuple[str, str]:
    """(key, where it came from). The source is safe to print; the key is not."""
    if os.environ.get(env_var):
        return os.environ[env_var], f"${env_var}"
    path = key_file()
    if path.exists():
        return path.read_text().strip(), str(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(32)
    try:  # O_EXCL: two servers starting at once must not overwrite each other's key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), str(path)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, str(path)


def matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
