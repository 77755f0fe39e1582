"""The Microsoft Agent Framework twins of the flows (flows/chat-maf, flows/eval-maf, flows/judge-maf): where
they are, how they load, and which endpoint they call.

agent-framework needs opentelemetry-api>=1.39 and promptflow 1.18.5 breaks above 1.38 (pyproject pins
~=1.38.0), so the twins live in a venv of their own (`make maf` -> .venv-maf, the project installed there
without its dependencies); commands in the main venv start that interpreter (FINETUNE_PHI_MAF_PYTHON overrides).
The endpoint comes from FINETUNE_PHI_ENDPOINT_URL (key: FINETUNE_PHI_API_KEY, else the local endpoint's key
file) or else from the Prompt flow connection `finetune-phi connect` made (default finetune_phi_endpoint; read
through the main venv when promptflow is not importable here) — never from a file in the repo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from . import project
from .errors import UserError
from .serving.connection import CONNECTION_NAME
from .serving.keys import KEY_ENV, existing_key


ENDPOINT_URL_ENV = "FINETUNE_PHI_ENDPOINT_URL"
MAF_PYTHON_ENV = "FINETUNE_PHI_MAF_PYTHON"  # an interpreter with agent-framework (default .venv-maf)
PF_PYTHON_ENV = "FINETUNE_PHI_PF_PYTHON"  # an interpreter with promptflow, to read a connection (default .venv)


class MafError(UserError):
    """The twins cannot run (no agent-framework venv, no endpoint settings, a run name taken): one line."""


def have_agent_framework() -> bool:
    return importlib.util.find_spec("agent_framework") is not None


def maf_python() -> str:
    python = os.environ.get(MAF_PYTHON_ENV) or str(project.root() / ".venv-maf" / "bin" / "python")
    if not Path(python).exists():
        raise MafError(
            f"no Agent Framework environment at {python}: create it with `make maf` "
            f"(or point {MAF_PYTHON_ENV} at a python that has agent-framework-core)"
        )
    return python


_modules: dict[Path, object] = {}


def load(folder: str | Path, file: str = "workflow.py"):
    """A twin's module (workflow.py: an Agent Framework workflow; evaluator.py: an Azure AI Evaluation evaluator),
    loaded from its folder as `pf` loads a flow folder."""
    path = Path(folder).resolve() / file
    if path not in _modules:
        if not path.exists():
            raise MafError(f"{path.parent} is not an Agent Framework twin: it has no {file}")
        spec = importlib.util.spec_from_file_location(f"maf_{path.parent.name.replace('-', '_')}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def is_chat(folder: str | Path) -> bool:
    """Whether a twin's folder holds the chat workflow (else an evaluator: flows/eval-maf, flows/judge-maf)."""
    return (Path(folder) / "workflow.py").exists()


def endpoint(connection: str | None = None, pf=None) -> tuple[str, str]:
    """(endpoint_url, api_key): FINETUNE_PHI_ENDPOINT_URL with FINETUNE_PHI_API_KEY (else the local
    endpoint's key file) unless a connection is named; else the Prompt flow connection."""
    url = os.environ.get(ENDPOINT_URL_ENV)
    if url and not connection:
        found = existing_key()
        if not found:
            raise MafError(f"{ENDPOINT_URL_ENV} is set but no key: set {KEY_ENV}")
        return url, found[0]
    return connection_settings(connection or CONNECTION_NAME, pf)


def connection_settings(name: str, pf=None) -> tuple[str, str]:
    """A Prompt flow connection's endpoint_url and api_key; without promptflow here (.venv-maf) the main venv reads
    pf's store and the key comes back over a pipe."""
    if pf is None and importlib.util.find_spec("promptflow") is not None:
        from promptflow.client import PFClient

        pf = PFClient()
    if pf is not None:
        conn = pf.connections.get(name, with_secrets=True, raise_error=False)
        if conn is None:
            raise MafError(
                f"no Prompt flow connection named {name!r}: create it with `finetune-phi connect`, "
                f"or set {ENDPOINT_URL_ENV} and {KEY_ENV}"
            )
        return conn.configs["endpoint_url"], conn.secrets["api_key"]
    python = os.environ.get(PF_PYTHON_ENV) or str(project.root() / ".venv" / "bin" / "python")
    if not Path(python).exists():
        raise MafError(
            f"no endpoint: set {ENDPOINT_URL_ENV} and {KEY_ENV} (promptflow is not "
            f"installed here to read the connection {name!r}, nor at {python}: point {PF_PYTHON_ENV} "
            "at the main venv's python)"
        )
    done = subprocess.run(
        [python, "-m", "finetune_phi.evaluation.maf_runner", "_connection", name],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:  # our one-line error, not pf's telemetry chatter around it
        ours = [line for line in done.stderr.splitlines() if "_connection: error: " in line]
        raise MafError(
            ours[-1].split(": error: ", 1)[1]
            if ours
            else f"reading the connection {name!r} with {python} failed: {done.stderr.strip()[-500:]}"
        )
    got = json.loads(done.stdout)
    return got["endpoint_url"], got["api_key"]
