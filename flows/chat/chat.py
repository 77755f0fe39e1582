"""Chat flow tool: the assistant's reply from the scoring endpoint, streamed (logic in finetune_phi.serving.client).

It returns a generator: `pf flow serve` sends each piece as it comes to clients that ask for
`text/event-stream`, and joins them for everyone else (pf flow test, batch runs).
"""
from promptflow.connections import CustomConnection
from promptflow.core import tool
from promptflow.exceptions import UserErrorException

from finetune_phi.serving.client import EndpointError, chat_stream, flow_inputs


@tool
def chat(connection: CustomConnection, question: str, chat_history: list = None, deployment: str = "",
         temperature: float = 0.7, max_tokens: int = 0):
    pinned, parameters = flow_inputs(deployment, temperature, max_tokens)
    try:  # connection and HTTP errors surface here, before the first piece (transient ones retried first)
        pieces = chat_stream(connection.configs["endpoint_url"], connection.secrets["api_key"], question,
                             chat_history or [], deployment=pinned, parameters=parameters)
    except EndpointError as e:  # a user-facing error (URL, HTTP status, attempts), not a bug in the tool
        raise UserErrorException(message=str(e)) from None
    return _as_user_errors(pieces)


def _as_user_errors(pieces):
    try:
        yield from pieces
    except EndpointError as e:  # the stream was cut off: an error, never a finished-looking answer
        raise UserErrorException(message=str(e)) from None
