"""What a batch run prints goes to its log file, not the console (compare's Prompt flow runs, the twins' evaluate())."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def console_to(log: Path):
    """A batch engine's own lines (Prompt flow's run submitted, log paths, workers started and terminated;
    azure-ai-evaluation's run summaries) go to `log`, not the console, where they would bury the lines a
    command prints. They are written to stdout, from worker processes too, so stdout and stderr are redirected
    at the file-descriptor level (children inherit them) while a run lasts; a failed run still raises here."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    console = {fd: os.dup(fd) for fd in (1, 2)}
    with log.open("a") as f:
        for fd in console:
            os.dup2(f.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            for fd, saved_fd in console.items():
                os.dup2(saved_fd, fd)
                os.close(saved_fd)
