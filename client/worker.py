"""A long-lived site worker: keeps torch, the task, the data split and the base model
loaded between Flower messages.

flwr 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode
receives; each one imports torch and fedcare and rebuilds the model. With ``fedcare
site start --worker`` the site also runs this worker, and the ClientApp (see
``fedcare.client.entry``) only forwards each message to it over a Unix socket that only
the site's user can open (socket 0600, plus a random auth key in a 0600 file). The
worker runs exactly the same ``fedcare.client.app`` handlers, one message at a time,
so the privacy ledger and the audit log are written by the same code, in order.

    python -m fedcare.client.worker --socket /path/site.sock
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from fedcare.errors import FedcareError


def key_path(socket_path: str | Path) -> Path:
    return Path(f"{socket_path}.key")


def _set_task_identity(identity: dict) -> None:
    """Messages built in this process must carry the run/node/task of the ClientApp
    process that forwarded them (Flower keeps these per process)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("run_id", "node_id", "task_id"):
        if identity.get(name) is not None:
            setattr(TaskIdentity, name, identity[name])


def serve(socket_path: str | Path, preload: bool = True) -> None:
    socket_path = Path(socket_path)
    if socket_path.exists():
        socket_path.unlink()
    key = secrets.token_bytes(32)
    kp = key_path(socket_path)
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    old_umask = os.umask(0o177)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old_umask)
    if preload:
        from . import app  # noqa: F401  torch, flwr, fedcare: paid once here
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fedcare site worker listening on {socket_path}", flush=True)
    try:
        while True:
            try:
                conn = listener.accept()
            except AuthenticationError as err:
                print(f"rejected a connection that failed authentication: {err}", file=sys.stderr, flush=True)
                continue
            except (OSError, EOFError) as err:
                print(f"dropped a connection: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                continue
            with conn:
                try:
                    kind, msg, context, identity = conn.recv()
                except (EOFError, OSError):
                    continue
                conn.send(_handle(kind, msg, context, identity))
    finally:
        listener.close()
        for p in (socket_path, kp):
            p.unlink(missing_ok=True)


def _handle(kind: str, msg, context, identity: dict):
    from . import app

    print(f"handling {kind} for Flower run {context.run_id}", flush=True)
    try:
        _set_task_identity(identity)
        handler = {"train": app.train, "evaluate": app.evaluate}[kind]
        reply = handler(msg, context)
        print(f"handled {kind} for Flower run {context.run_id}", flush=True)
        return ("ok", reply.content, context.state)
    except Exception as err:  # reported back to the ClientApp, which raises it; SIGTERM
        # (SystemExit) and Ctrl-C (KeyboardInterrupt) are not Exceptions: they end the worker
        return ("error", f"{type(err).__name__}: {err}", traceback.format_exc())


def forward(kind: str, msg, context, socket_path: str):
    """Called inside the ClientApp process: let the worker handle the message."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    try:
        key = key_path(socket_path).read_bytes()
        conn = Client(socket_path, family="AF_UNIX", authkey=key)
    except OSError as err:
        raise FedcareError(f"the site worker at {socket_path} is not running ({err.strerror or err}); "
                           "restart `fedcare site start --worker`") from None
    identity = {name: getattr(TaskIdentity, f"_{name}", None) for name in ("run_id", "node_id", "task_id")}
    with conn:
        conn.send((kind, msg, context, identity))
        status, content, extra = conn.recv()
    if status != "ok":
        raise RuntimeError(f"site worker failed: {content}\n{extra}")
    context.state = extra
    return Message(content, reply_to=msg)


def main() -> None:
    ap = argparse.ArgumentParser(description="fedcare long-lived site worker")
    ap.add_argument("--socket", required=True)
    args = ap.parse_args()
    serve(args.socket)


if __name__ == "__main__":
    main()
