"""The Prompt flow connection the flows use to reach the endpoint: CustomConnection `finetune_phi_endpoint`.

configs: endpoint_url (the scoring URI); secrets: api_key (kept in Prompt flow's encrypted store,
never in the flow folder or git).
"""

from __future__ import annotations

import os

from ..errors import UserError
from .client import scoring_url
from .keys import KEY_ENV, existing_key, key_file


CONNECTION_NAME = "finetune_phi_endpoint"


def resolve_key(api_key_env: str | None) -> tuple[str, str]:
    """The key to store: from the named env var, else the local endpoint's key. Returns (key, source)."""
    if api_key_env:
        if not os.environ.get(api_key_env):
            raise UserError(f"--api-key-env {api_key_env}: the environment variable is not set")
        return os.environ[api_key_env], f"${api_key_env}"
    found = existing_key()
    if found:
        return found
    raise UserError(
        f"no API key: set {KEY_ENV}, pass --api-key-env VAR, or start `finetune-phi serve` once "
        f"so it generates {key_file()}"
    )


def connect(endpoint_url: str, api_key: str, name: str = CONNECTION_NAME):
    """Create or update the connection; returns it (secrets scrubbed by Prompt flow)."""
    from promptflow.client import PFClient
    from promptflow.entities import CustomConnection

    connection = CustomConnection(
        name=name, configs={"endpoint_url": scoring_url(endpoint_url)}, secrets={"api_key": api_key}
    )
    return PFClient().connections.create_or_update(connection)
