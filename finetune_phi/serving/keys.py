"""The endpoint's API key: from FINETUNE_PHI_API_KEY, or generated once into a 0600 file outside the repo.

A key can never be empty: the file appears only complete (written to a temp file, fsynced, then
hard-linked into place, which fails if another process won the race), a key that is empty or
malformed is refused wherever it comes from, and an empty bearer token never matches.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

from ..errors import UserError


KEY_ENV = "FINETUNE_PHI_API_KEY"
MIN_KEY_LENGTH = 16
# What an Authorization header carries safely: printable ASCII without spaces.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


class InvalidKeyError(UserError, ValueError):
    """An API key that is empty or malformed; the server refuses to start with it."""


def key_file() -> Path:
    root = (
        os.environ.get("FINETUNE_PHI_CONFIG")
        or Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "finetune-phi"
    )
    return Path(root) / "api_key"


def check_key(key: str, source: str) -> str:
    """The key if it is usable; otherwise an error naming where it came from (never the key itself)."""
    if not key:
        raise InvalidKeyError(f"the API key from {source} is empty")
    if not _KEY_CHARS.fullmatch(key):
        raise InvalidKeyError(
            f"the API key from {source} has spaces or characters a header cannot carry (use printable ASCII only)"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise InvalidKeyError(f"the API key from {source} has {len(key)} characters; use at least {MIN_KEY_LENGTH}")
    return key


def _read_key_file(path: Path) -> str:
    key = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        return check_key(key, str(path))
    except InvalidKeyError as e:
        raise InvalidKeyError(f"{e}; delete {path} and a new key is generated at the next start") from None


def existing_key(env_var: str = KEY_ENV) -> tuple[str, str] | None:
    """(key, where it came from) from the environment or the key file, checked; None when neither has one.
    The source is safe to print; the key is not."""
    if os.environ.get(env_var):
        return check_key(os.environ[env_var].strip(), f"${env_var}"), f"${env_var}"
    path = key_file()
    if path.exists():
        return _read_key_file(path), str(path)
    return None


def get_or_create_key(env_var: str = KEY_ENV) -> tuple[str, str]:
    """(key, where it came from): the existing key, else a new one generated into the key file."""
    if env_var in os.environ and not os.environ[env_var]:
        check_key("", f"${env_var}")  # set but empty: refused, not replaced by the file
    found = existing_key(env_var)
    if found:
        return found
    path = key_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(prefix=".api_key.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:  # link, unlike rename, refuses to replace: of two servers starting at once, one key wins
            os.link(tmp, path)
        except FileExistsError:
            return _read_key_file(path), str(path)  # the other process's key, complete before it was linked
    finally:
        os.unlink(tmp)
    return key, str(path)


def matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right.

    Neither side may be empty: an empty expected key must never let an empty token through.
    """
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
