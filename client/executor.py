"""The site's executor: one long-lived process that runs every ClientApp task of its
SuperNode, with torch, the task, the data split and the base model already loaded.

Stock flwr 1.41 starts a fresh ``flwr-clientapp`` process for every message (via the
SuperExec the SuperNode spawns with ``--isolation subprocess``); each one reinstalls the
app bundle and imports torch, flwr and fedcare (seconds of CPU). With ``flower-supernode
--isolation process`` the SuperNode spawns nothing and waits for an external executor to
claim its tasks on the Runtime API. This module is that executor, doing what
``flower-superexec`` + ``flwr-clientapp`` do, in one process:

1. ``AcquireTask`` (signed with the SuperExec HMAC secret the SuperNode was given with
   ``--superexec-auth-secret-file``) returns a task and a token;
2. with the token: ``PullTaskInput`` (context, run) and ``PullMessages`` (the message),
   then fedcare's ClientApp (``fedcare.client.app.app``, the same handlers, ledger and
   audit as every other path), ``PushMessages`` / ``PushObject`` (the reply) and
   ``PushTaskOutput`` (the context, with the site's personal state), with task
   heartbeats while it runs.

A handler that raises becomes an error reply (as ``flwr-clientapp`` sends) and the loop
goes on. It leans on flwr internals; ``FLWR_INTERNALS`` lists them and
``tests/test_flwr_internals.py`` fails loudly when a flwr release moves them.

    python -m fedcare.client.executor --runtime-api 127.0.0.1:9094 --secret-file SECRET
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass

FLWR_CLIENTAPP_TASK = "flwr-clientapp"
# (module, names) of every flwr internal used here: checked by tests/test_flwr_internals.py
FLWR_INTERNALS = {
    "flwr.supercore.runtime": ["RuntimeHttpClient"],
    "flwr.supercore.interceptors": ["RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor",
                                    "SuperExecAuthHttpInterceptor"],
    "flwr.supercore.retry": ["make_simple_http_retry_invoker"],
    "flwr.supernode.runtime.run_clientapp": ["pull_task_input", "push_message", "push_task_output",
                                             "pull_and_inflate_object_from_tree"],
    "flwr.proto.runtime_pb2": ["AcquireTaskRequest", "SendTaskHeartbeatRequest"],
    "flwr.common.constant": ["ErrorCode", "SubStatus"],
}
RPCS = ("AcquireTask", "SendTaskHeartbeat", "PullTaskInput", "PullMessages", "PullObject",
        "ConfirmMessageReceived", "PushMessages", "PushObject", "PushTaskOutput")
ACQUIRE_RPC = "/flwr.proto.Runtime/AcquireTask"   # the one RPC the SuperExec secret signs


@dataclass
class Outcome:
    """What became of one task."""

    kind: str           # the message type: train, evaluate, ...
    ok: bool
    details: str        # the error, when not ok
    seconds: float


def handle(message, context):
    """Run fedcare's ClientApp on one message; a raising handler gives an error reply
    (what ``flwr-clientapp`` sends) instead of ending the process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    from .app import app

    try:
        return app(message=message, context=context), ""
    except Exception as err:  # noqa: BLE001  one bad message must not end the site
        reason = f"{type(err)}:<'{err}'>"
        print(traceback.format_exc(), flush=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), reason


def _client(address: str, interceptor, retry_invoker=None):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), interceptor],
        retry_invoker=retry_invoker or make_simple_http_retry_invoker())


TASK_RETRY_S = 60.0   # how long one task's calls retry a restarting SuperNode before the task is dropped
# How long a task waits for its message's content (the SuperNode creates the task, then
# fetches the content from the SuperLink). flwr's default is 2 hours of retries; a task
# whose run ended (the coordinator restarted) never gets it, and would keep the executor
# from the new run's tasks all that time. Raise it (FEDCARE_TASK_INPUT_MAX_S) where a
# model takes longer than this to cross the site's link.
TASK_INPUT_MAX_S = float(os.environ.get("FEDCARE_TASK_INPUT_MAX_S", 60.0))


def _task_retry_invoker():
    """Retries for the executor's calls that give up instead of ending the process.
    Flower's simple HTTP invoker sends SIGINT to its own process on 401 (right for a
    one-task flwr-clientapp, fatal for a long-lived executor): a task whose run has ended
    (the coordinator restarted) must fail alone while the executor goes on claiming, and
    a claim refused for a wrong SuperExec secret must say so (``SiteExecutor.serve``)."""
    import httpx
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (400, 401, 403, 404)

    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
                        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=TASK_RETRY_S, should_giveup=give_up)


class _Heartbeat(threading.Thread):
    """Task heartbeats while a handler runs, so the SuperNode keeps the token alive."""

    def __init__(self, client, interval: float = 10.0):
        super().__init__(daemon=True)
        self.client, self.interval, self.done = client, interval, threading.Event()

    def run(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        while not self.done.wait(self.interval):
            try:
                self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except Exception:  # noqa: BLE001  a missed beat is retried; the task goes on
                pass


class SiteExecutor:
    def __init__(self, runtime_api: str, secret: bytes | None, poll: float = 0.05):
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

        self.address, self.poll = runtime_api, poll
        signer = SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[ACQUIRE_RPC]) \
            if secret else _NoInterceptor()
        self.claims = _client(runtime_api, signer, _task_retry_invoker())
        self.stopping = False

    def acquire(self):
        """(token, task) of the oldest pending ClientApp task, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        res = self.claims.AcquireTask(AcquireTaskRequest(supported_task_types=[FLWR_CLIENTAPP_TASK]))
        return (res.token, res.task) if res.HasField("task") and res.token else None

    def run_task(self, token: str) -> Outcome:
        from flwr.common.constant import SubStatus
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        t0 = time.perf_counter()
        client = _client(self.address, RuntimeTokenHttpInterceptor(token), _task_retry_invoker())
        beat = _Heartbeat(client)
        beat.start()
        context, kind, details = None, "?", "the task input could not be read"
        try:
            message, context, _run, _fab = pull_task_input(client)
            kind = message.metadata.message_type
            reply, details = handle(message, context)
            push_message(client, reply, context)
        except Exception as err:  # noqa: BLE001  e.g. a message that cannot be inflated
            details = details if context is None else f"{type(err).__name__}: {err}"
            print(traceback.format_exc(), flush=True)
        finally:
            beat.done.set()
            try:
                push_task_output(client, context, SubStatus.FAILED if details else SubStatus.COMPLETED, details)
            except Exception as err:  # noqa: BLE001  the run ended meanwhile: nothing left to report to
                details = details or f"task output not delivered ({type(err).__name__})"
            client.close()
        return Outcome(kind, not details, details, time.perf_counter() - t0)

    def serve(self, preload: bool = True, warm: dict | None = None) -> None:
        bound_task_input_wait()
        if preload:
            from . import app  # noqa: F401  torch, flwr, fedcare: paid once, before the first task
        if warm:
            warm_up(**warm)
        print(f"fedcare site executor claiming tasks from the SuperNode at {self.address}", flush=True)
        while not self.stopping:
            try:
                claimed = self.acquire()
            except Exception as err:  # noqa: BLE001  SuperNode restarting: keep trying
                if _refused(err):
                    raise ExecutorAuthError(
                        f"the SuperNode at {self.address} refused this executor's SuperExec authentication "
                        f"(HTTP {err.response.status_code}): --secret-file must be the file the SuperNode was "
                        "started with (--superexec-auth-secret-file)") from None
                print(f"cannot reach the SuperNode's Runtime API ({type(err).__name__}); retrying", flush=True)
                time.sleep(1.0)
                continue
            if claimed is None:
                time.sleep(self.poll)
                continue
            print(f"running task {claimed[1].task_id} of run {claimed[1].run_id}", flush=True)
            outcome = self.run_task(claimed[0])
            status = "handled" if outcome.ok else "failed"
            print(f"{status} {outcome.kind} task {claimed[1].task_id} of run {claimed[1].run_id} "
                  f"in {outcome.seconds:.2f} s{'' if outcome.ok else ': ' + outcome.details}", flush=True)
        self.claims.close()


def bound_task_input_wait(max_s: float = TASK_INPUT_MAX_S) -> None:
    """Make ``pull_task_input`` (flwr's, used as it is) give up on a message whose
    objects do not arrive within ``max_s`` seconds: the task then fails alone and the
    executor claims the next one."""
    import functools

    from flwr.supernode.runtime import run_clientapp

    pull = run_clientapp.pull_and_inflate_object_from_tree
    pull = getattr(pull, "func", pull)   # once, however often this is called
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(pull, max_time=max_s)


def warm_up(task: str, site_id: str, data_path: str, lora_rank: int | None = None) -> None:
    """Load the site's data split and build the task's model (pretrained weights
    included) with the task's default settings, before the first task arrives: a run
    with those settings finds both cached, others still find the base weights loaded."""
    from fedcare.launch import resolve_config
    from fedcare.models.registry import get_task

    from .site import Site

    cfg = resolve_config(task, [])
    cfg.data.path = data_path
    node_config = {"site-id": site_id, "data-path": data_path, **({"lora-rank": lora_rank} if lora_rank else {})}
    site = Site(site_id=site_id, cfg=cfg, task=get_task(task), node_config=node_config)
    site.split()
    site.model()


class ExecutorAuthError(RuntimeError):
    """The SuperNode refused the executor's claims (a wrong SuperExec secret)."""


def _refused(err: Exception) -> bool:
    import httpx

    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403)


class _NoInterceptor:
    def intercept(self, context, call_next):
        return call_next(context)


def main() -> None:
    ap = argparse.ArgumentParser(description="fedcare site executor (claims the SuperNode's ClientApp tasks)")
    ap.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's Runtime API")
    ap.add_argument("--secret-file", help="the SuperExec auth secret the SuperNode was started with")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between task claims when idle")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 when sites share a machine's cores")
    ap.add_argument("--warm-task", help="load this task's data and model for the site before the first task")
    ap.add_argument("--site-id")
    ap.add_argument("--data-path")
    ap.add_argument("--lora-rank", type=int)
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    secret = open(args.secret_file, "rb").read() if args.secret_file else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    executor = SiteExecutor(args.runtime_api, secret, args.poll)

    def stop(*_):
        executor.stopping = True   # finish the task in hand, then leave

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    warm = None
    if args.warm_task:
        warm = {"task": args.warm_task, "site_id": args.site_id, "data_path": args.data_path,
                "lora_rank": args.lora_rank}
    try:
        executor.serve(warm=warm)
    except ExecutorAuthError as err:
        print(f"error: {err}", flush=True)
        raise SystemExit(2) from None
    print("fedcare site executor stopped", flush=True)


if __name__ == "__main__":
    main()
