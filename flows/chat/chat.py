"""Chat flow tool: the assistant's reply from the scoring endpoint, streamed (logic in finetune_phi.serving.client).

It returns a generator: `pf flow serve` sends each piece as it comes to clients that ask for
`text/event-stream`, and joins them for everyone else (pf flow test, batch runs).

Errors keep the endpoint's own message. What the endpoint refused in this request (a question over the
model's context, an unknown deployment, a body too large) is a UserErrorException, which `pf flow serve`
answers with 400; the endpoint down, a wrong key or its 5xx is a SystemErrorException: a 500 there.
"""

from promptflow.connections import CustomConnection
from promptflow.core import tool
from promptflow.exceptions import SystemErrorException, UserErrorException

from finetune_phi.serving.client import EndpointError, chat_stream, flow_inputs


@tool
def chat(
    connection: CustomConnection,
    question: str,
    chat_history: list = None,
    deployment: str = "",
    temperature: float = 0.7,
    max_tokens: int = 0,
):
    pinned, parameters = flow_inputs(deployment, temperature, max_tokens)
    try:  # connection and HTTP errors surface here, before the first piece (transient ones retried first)
        pieces = chat_stream(
            connection.configs["endpoint_url"],
            connection.secrets["api_key"],
            question,
            chat_history or [],
            deployment=pinned,
            parameters=parameters,
        )
    except EndpointError as e:  # the message names URL, HTTP status and attempts
        raise _flow_error(e) from None
    return _pieces(pieces)


def _pieces(pieces):
    try:
        yield from pieces
    except EndpointError as e:  # the stream was cut off: an error, never a finished-looking answer
        raise _flow_error(e) from None


def _flow_error(e: EndpointError):
    return (UserErrorException if e.callers_fault else SystemErrorException)(message=str(e))
