"""The long-lived site worker: runs the ClientApp's handlers for forwarded messages,
writes the site's audit log itself, and accepts only holders of its key."""
import shutil
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare import schemas as S
from fedcare.client.audit import AuditLog
from fedcare.client.worker import forward, key_path
from fedcare.config import RunConfig
from fedcare.records import from_array_record, to_array_record
from fedcare.server.deploy import start_worker
from fedcare.server.federation import initial_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 11, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_worker_trains_and_audits_for_the_clientapp(tmp_path, identity):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ROOT / "data" / "heart-disease" / "processed.cleveland.data", data)
    sock = tmp_path / "w.sock"
    worker = start_worker(sock, tmp_path)
    try:
        assert key_path(sock).stat().st_mode & 0o777 == 0o600
        with pytest.raises(AuthenticationError):
            Client(str(sock), family="AF_UNIX", authkey=b"not the key")

        cfg = RunConfig.from_flat({"task": "heart-disease", "rounds": 2, "train.local_steps": 3}).validate()
        cfg.runtime.run_id = "run-worker-test"
        node_config = {"site-id": "cleveland", "data-path": str(data), "ledger": str(tmp_path / "ledger.db"),
                       "audit": str(tmp_path / "audit.jsonl"), "worker": str(sock)}
        ctx = Context(run_id=7, node_id=11, node_config=node_config, state=RecordDict(),
                      run_config=cfg.to_flat())
        state = initial_state(cfg)
        for rnd in (1, 2):
            msg = Message(RecordDict({S.ARRAYS: to_array_record(state), S.CONFIG: ConfigRecord({"server-round": rnd})}),
                          dst_node_id=11, message_type="train")
            reply = forward("train", msg, ctx, str(sock))
            assert reply.metadata.reply_to_message_id == msg.metadata.message_id
            assert reply.content[S.METRICS][S.NUM_EXAMPLES] == 199
            new = from_array_record(reply.content[S.ARRAYS])
            assert new.keys() == state.keys()
            assert any(not np.allclose(new[k], state[k]) for k in state)
            state = new
        entries = list(AuditLog(tmp_path / "audit.jsonl").entries())
        assert [(e["round"], e["kind"], e["decision"]) for e in entries] == [(1, "train", "sent"), (2, "train", "sent")]
        assert AuditLog(tmp_path / "audit.jsonl").verify() == []
    finally:
        worker.stop()
    assert not sock.exists() and not key_path(sock).exists()
