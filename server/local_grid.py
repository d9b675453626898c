"""An in-process Flower Grid for benchmarks: the same ServerApp loop and ClientApp
handlers, exchanging the same Flower ``Message`` objects, with the virtual sites
called directly in this process instead of through a SuperLink and Ray.

Many benchmark runs (strategies x seeds x epsilons) would otherwise spend most of
their time starting SuperLinks and Ray; the numbers do not depend on the transport.
``fedcare simulate``, ``fedcare server run`` and the end-to-end tests always use the
real Flower runtime; the benchmarks check that both give the same result.
"""
from __future__ import annotations

from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedcare.config import RunConfig


class InProcessGrid(Grid):
    def __init__(self, cfg: RunConfig, num_sites: int, node_configs: list[dict] | None = None) -> None:
        """``node_configs``: one SuperNode node config per site (e.g. ``site-id`` and
        ``data-path``, as a deployed site sets them); default: virtual partitions."""
        from fedcare.client.app import app as client_app

        self._client_app = client_app
        # the identity Flower's runtime gives a ServerApp process (server node id 0)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self._run = Run.create_empty(run_id=1)
        flat = cfg.to_flat()
        self._contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config=flat,
                              node_config=(node_configs[i] if node_configs
                                           else {"partition-id": i, "num-partitions": num_sites}))
            for i in range(num_sites)
        }
        self._next_id = 0
        self._replies: dict[str, Message] = {}

    # -- Grid API ------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run if isinstance(run, Run) else Run.create_empty(run_id=int(run))

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the virtual sites' handlers now; their replies wait for ``pull_messages``."""
        ids = []
        for msg in messages:
            self._next_id += 1
            msg.metadata.__dict__["_message_id"] = f"local-{self._next_id}"
            msg.metadata.__dict__["_src_node_id"] = 0
            ctx = self._contexts[msg.metadata.dst_node_id]
            try:
                reply = self._client_app(msg, ctx)
            except Exception as err:  # what Flower does with a ClientApp exception
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
