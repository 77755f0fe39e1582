"""Chat flow tool: one assistant turn from the scoring endpoint (logic lives in finetune_phi.client)."""
from promptflow.connections import CustomConnection
from promptflow.core import tool
from promptflow.exceptions import UserErrorException

from finetune_phi.client import EndpointError
from finetune_phi.client import chat as endpoint_chat


@tool
def chat(connection: CustomConnection, question: str, chat_history: list = None, deployment: str = "") -> str:
    try:
        return endpoint_chat(connection.configs["endpoint_url"], connection.secrets["api_key"], question,
                             chat_history or [], deployment=deployment or None)
    except EndpointError as e:  # a user-facing error (URL, HTTP status), not a bug in the tool
        raise UserErrorException(message=str(e)) from None
