"""A server process on this machine and the wait until it answers: the demo, bench/ and the tests share it.

Standard library only, so that it loads before (and without) the heavy libraries.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path


class NotReady(RuntimeError):
    """The server exited, refused for good (e.g. its model failed to load) or did not answer in time."""


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it is free on 127.0.0.1, else a free port the OS picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise NotReady("no free port on 127.0.0.1")


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not Path(log).exists():
        return ""
    return f"\n--- last lines of {log} ---\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def get(url: str, headers: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of a GET; OSError when nothing answers."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", u.path or "/", headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as e:  # a server still starting can drop the connection half way
        raise OSError(str(e)) from e
    finally:
        conn.close()


def wait_ready(
    url: str,
    *,
    headers: dict | None = None,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    timeout: float = 300,
    interval: float = 0.2,
) -> None:
    """Return once GET url answers 200. NotReady (with the log's tail) as soon as `proc` exits, when the
    endpoint says its models failed to load (503 load_failed: it will never be ready), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = get(url, headers)
            if status == 200:
                return
            if status == 503 and b"load_failed" in body:
                raise NotReady(f"{url}: {json.loads(body)['error']['message']}{log_tail(log)}")
        except OSError:
            pass  # not listening yet
        if proc is not None and proc.poll() is not None:
            raise NotReady(f"the server exited with code {proc.returncode} before {url} answered{log_tail(log)}")
        if time.monotonic() >= deadline:
            raise NotReady(f"{url} did not answer 200 within {timeout:g} s{log_tail(log)}")
        time.sleep(interval)
