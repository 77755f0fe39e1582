"""The project's own files (flows/, deploy/, conda.yml and the side venvs) and where to find them.

The package never assumes it sits inside the repository: `pip install .` puts it in site-packages,
without flows/. The project root is, in order: `--project PATH` (or FINETUNE_PHI_PROJECT), the
current directory, then the source checkout of an editable install (`pip install -e .`, what `make`
does). A root without flows/chat/flow.dag.yaml is an error that says how to point at one.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


PROJECT_ENV = "FINETUNE_PHI_PROJECT"
MARKER = Path("flows") / "chat" / "flow.dag.yaml"
_chosen: Path | None = None  # set once by the CLI's --project


class ProjectNotFound(UserError):
    """No finetune-phi project (flows/, deploy/) where one was looked for."""


def use(path: str | Path | None):
    """The project root for this process (the CLI's --project); None: look it up as the module says."""
    global _chosen
    _chosen = None if path is None else _check(Path(path).expanduser().resolve(), "--project")


def root() -> Path:
    if _chosen is not None:
        return _chosen
    if explicit := os.environ.get(PROJECT_ENV):
        return _check(Path(explicit).expanduser().resolve(), PROJECT_ENV)
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / MARKER).is_file():
            return candidate
    raise ProjectNotFound(
        f"no finetune-phi project in {Path.cwd()} (no {MARKER}): run from the repository's "
        f"folder, or pass --project PATH (or set {PROJECT_ENV})"
    )


def _check(path: Path, source: str) -> Path:
    if not (path / MARKER).is_file():
        raise ProjectNotFound(f"{source} {path}: not a finetune-phi project (no {MARKER})")
    return path


def flow(name: str) -> Path:
    """flows/NAME of the project: chat, eval, chat-maf, eval-maf."""
    return root() / "flows" / name
