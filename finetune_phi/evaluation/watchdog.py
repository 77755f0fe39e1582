"""Children die with the parent: a watchdog process for commands that start many (compare).

`compare` runs Prompt flow batch runs, whose worker processes (a dozen, over 1 GB) and the Agent
Framework runner keep calling the endpoint if compare is killed with SIGKILL, which no handler can
catch. The watchdog is a small process of its own that reads a pipe from its parent until the pipe
closes, which happens however the parent ends; meanwhile it notes the parent's descendants twice a
second, and then ends the ones still running (SIGTERM, then SIGKILL). A re-run continues with
`compare --resume NAME`.

    with dies_with_me():
        ...  # every process started in here is ended if this process is killed
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from contextlib import contextmanager


POLL = 0.5


@contextmanager
def dies_with_me():
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "finetune_phi.evaluation.watchdog", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:  # a normal end: the children are done; the watchdog stops without killing anything
        watchdog.stdin.write(b"done\n")
        watchdog.stdin.close()
        watchdog.wait(timeout=30)


def _watch(parent: int):
    import psutil

    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.buffer, selectors.EVENT_READ)
    while True:
        try:
            for child in psutil.Process(parent).children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        if selector.select(timeout=POLL):
            if sys.stdin.buffer.readline().strip() == b"done":
                return  # the parent finished normally
            break  # EOF: the parent is gone
    alive = [p for p in seen.values() if p.is_running()]  # is_running also checks the pid was not reused
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
