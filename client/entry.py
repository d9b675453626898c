"""The ClientApp Flower starts for every message: thin on purpose.

If the SuperNode's node config names a site ``worker`` socket (``fedcare site start
--worker``), the message is forwarded to that long-lived process, which already has
torch, the data and the model loaded; this process then never imports torch. Otherwise
(simulation, or a site without a worker) the handlers of ``fedcare.client.app`` run
here, as before.
"""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _dispatch(kind: str, msg: Message, context: Context) -> Message:
    socket_path = context.node_config.get("worker")
    if socket_path:
        from .worker import forward

        return forward(kind, msg, context, str(socket_path))
    from . import app as local

    return getattr(local, kind)(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _dispatch("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _dispatch("evaluate", msg, context)
