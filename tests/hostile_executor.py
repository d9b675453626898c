"""A hostile hospital for the real-process trust-boundary test: fedcare's own site
executor (``fedcare.client.executor``) whose train replies are tampered with after the
real handler made them, before they leave the site.

    python tests/hostile_executor.py MODE EXECUTOR-ARGS...

MODE:
- ``bad-json-then-replay``: round 1's reply carries malformed privacy JSON; round 2
  sends round 1's reply again (its nonce is stale);
- ``oversized``: every train reply carries a 64 MiB array where the model has a small one.
"""
from __future__ import annotations

import sys

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedcare import schemas as S
from fedcare.client import executor

MODE = sys.argv.pop(1)
_honest = executor.handle
_sent: list[RecordDict] = []   # round 1's honest train reply, replayed in round 2


def _replace(content: RecordDict, key: str, record) -> RecordDict:
    records = dict(content.items())
    records[key] = record
    return RecordDict(records)


def hostile(message, context):
    reply, details = _honest(message, context)
    if details or message.metadata.message_type.split(".")[0] != "train":
        return reply, details
    content = reply.content
    if MODE == "bad-json-then-replay":
        if _sent:
            return Message(_sent[0], reply_to=message), ""
        _sent.append(content)
        info = dict(content[S.SITE].items())
        info[S.PRIVACY_JSON] = "{not json"
        content = _replace(content, S.SITE, ConfigRecord(info))
    elif MODE == "oversized":
        arrays = dict(content[S.ARRAYS].items())
        arrays[next(iter(arrays))] = Array(np.zeros((4096, 4096), dtype=np.float32))
        content = _replace(content, S.ARRAYS, ArrayRecord(arrays))
    else:
        raise SystemExit(f"unknown mode {MODE}")
    return Message(content, reply_to=message), ""


executor.handle = hostile
if __name__ == "__main__":
    executor.main()
