"""Azure ML settings from flags and environment variables (a `.env` beside you works too).

No secrets live here: credentials come from azure-identity's DefaultAzureCredential (`az login`,
a managed identity, or the AZURE_CLIENT_* variables of a service principal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import UserError


# setting -> (flag, environment variable, what it is)
SETTINGS = {
    "subscription_id": ("--subscription-id", "AZURE_SUBSCRIPTION_ID", "Azure subscription id"),
    "resource_group": ("--resource-group", "AZURE_RESOURCE_GROUP", "resource group of the workspace"),
    "workspace": ("--workspace", "AZUREML_WORKSPACE_NAME", "Azure ML workspace name"),
    "location": ("--location", "AZURE_LOCATION", "Azure region, e.g. eastus2 (for messages and new resources)"),
    "identity": ("--identity", "AZUREML_IDENTITY_ID", "resource id of a user-assigned managed identity (optional)"),
}


class MissingSetting(UserError, ValueError):
    """A required Azure setting is not set; the message says how to set it."""


@dataclass
class AzureSettings:
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace: str | None = None
    location: str | None = None
    identity: str | None = None

    @classmethod
    def load(cls, **flags) -> AzureSettings:
        """Flags first, then environment variables, then a `.env` file in the working directory."""
        dotenv = {}
        if (Path.cwd() / ".env").is_file():  # the working directory's .env; read, not exported
            from dotenv import dotenv_values

            dotenv = dotenv_values(Path.cwd() / ".env")
        values = {}
        for f in fields(cls):
            env = SETTINGS[f.name][1]
            values[f.name] = flags.get(f.name) or os.environ.get(env) or dotenv.get(env) or None
        return cls(**values)

    def require(self, *names: str) -> AzureSettings:
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            how = "; ".join(f"{SETTINGS[n][2]}: pass {SETTINGS[n][0]} or set {SETTINGS[n][1]}" for n in missing)
            raise MissingSetting(
                f"missing Azure setting(s) {', '.join(missing)} ({how}; a .env file in the "
                "working directory works too, keep it out of git)"
            )
        return self

    def ml_client(self):
        """An MLClient for the workspace, authenticated by DefaultAzureCredential."""
        from azure.ai.ml import MLClient
        from azure.identity import DefaultAzureCredential

        self.require("subscription_id", "resource_group", "workspace")
        return MLClient(DefaultAzureCredential(), self.subscription_id, self.resource_group, self.workspace)
