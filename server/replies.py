"""A site's reply, decoded once and defensively into one ``SiteUpdate``.

Order matters: who sent it (the authenticated node, never the reply's own ``site_id``),
then sizes (each array's declared shape and dtype against the global state, before any
tensor is decoded), then types and JSON fields. Whatever is wrong rejects that site for
this message with the reason; nothing a site sends can fail the run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedcare import schemas as S
from fedcare.errors import ConfigError
from fedcare.records import from_array_record

MAX_JSON_CHARS = 2_000_000      # one JSON field of a reply (fairness counts are the largest)
NPY_HEADER_SLACK = 4096         # bytes an array may carry beyond its raw data (the .npy header)


class BadReply(Exception):
    """The reason a reply is rejected."""


class Identities:
    """Which site each authenticated node is. With the coordinator's registry
    (``runtime.sites_file``: node id -> site id, written when keys are registered) a node
    is its registered site; without one (simulation) a node is the site it first
    answered as, and no other node may take that name later in the run."""

    def __init__(self, registered: Mapping[int, str] | None = None) -> None:
        self.registered = dict(registered or {})
        self.bound: dict[int, str] = {}

    @classmethod
    def from_file(cls, path: str) -> "Identities":
        if not path:
            return cls()
        try:
            doc = json.loads(Path(path).read_text())
            return cls({int(node): str(site) for node, site in doc.items()})
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigError(f"site registry {path} cannot be read: {err}") from None

    def name(self, node: int) -> str | None:
        return self.registered.get(node) or self.bound.get(node)

    def resolve(self, node: int, claimed: str) -> str:
        """The site this node is; raise BadReply when it claims to be another."""
        if self.registered:
            site = self.registered.get(node)
            if site is None:
                raise BadReply(f"node {node} is not registered to any site")
            if claimed != site:
                raise BadReply(f"reply claims site '{claimed}' but node {node} is registered as '{site}'")
            return site
        site = self.bound.get(node)
        if site is not None and claimed != site:
            raise BadReply(f"reply claims site '{claimed}' but node {node} answered as '{site}' before")
        owner = next((n for n, s in self.bound.items() if s == claimed and n != node), None)
        if owner is not None:
            raise BadReply(f"reply claims site '{claimed}', which node {owner} answers as")
        self.bound[node] = claimed
        return claimed


def parse_reply(reply, kind: str, identities: Identities, nonce: str,
                expected: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                allow_lower_rank: bool = False) -> S.SiteUpdate:
    """Decode one reply to a ``kind`` ("train" | "evaluate") message of this round."""
    node = int(reply.metadata.src_node_id)
    update = S.SiteUpdate(node_id=node, site=identities.name(node) or f"node-{node}", status=S.REJECTED,
                          message=reply)
    if reply.has_error():
        update.status, update.reason = S.FAILED, f"site error: {reply.error.reason}"
        return update
    try:
        _decode(reply.content, kind, identities, nonce, expected, allow_lower_rank, update)
    except BadReply as err:
        update.status, update.reason = S.REJECTED, str(err)
    return update


def _decode(content, kind, identities, nonce, expected, allow_lower_rank, update: S.SiteUpdate) -> None:
    info = content.config_records.get(S.SITE)
    if info is None:
        raise BadReply("the reply has no 'site' record")
    claimed = info.get(S.SITE_ID)
    if not isinstance(claimed, str) or not claimed:
        raise BadReply("site_id is missing or not a string")
    update.site = identities.resolve(update.node_id, claimed)
    status = info.get(S.STATUS)
    if status == "refused":
        update.status, update.reason = S.REFUSED, _text(info.get(S.REASON, ""), "reason")
        return
    if status != "ok":
        raise BadReply(f"status {status!r} is neither 'ok' nor 'refused'")
    if info.get(S.NONCE) != nonce:
        raise BadReply("it does not carry this round's nonce (a replayed or stale reply)")
    metrics = content.metric_records.get(S.METRICS)
    if metrics is None:
        raise BadReply("no 'metrics' record")
    _decode_results(dict(metrics.items()), info, update)
    update.train_loss = update.metrics.get(S.TRAIN_LOSS)
    update.duration_s = update.metrics.get(S.DURATION_S)
    update.update_bytes = int(update.metrics.get(S.UPDATE_BYTES, 0))
    update.privacy = _json(info, S.PRIVACY_JSON)
    if update.privacy is not None and not isinstance(update.privacy.get("epsilon"), (int, float)):
        raise BadReply("privacy_json has no numeric epsilon")
    if S.LORA_RANK in info:
        rank = info[S.LORA_RANK]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise BadReply(f"lora_rank {rank!r} is not a positive integer")
        update.lora_rank = rank
    update.worker = _text(info.get(S.WORKER, ""), "worker")[:200]
    if kind == "train":
        record = content.array_records.get(S.ARRAYS)
        if record is None:
            raise BadReply("no 'arrays' record")
        check_declared_arrays(record, expected or {}, allow_lower_rank)
        update.arrays = dict(from_array_record(record))
    update.status = "ok"


def parse_evaluation(reply, identities: Identities, nonce: str) -> S.SiteUpdate | None:
    """The evaluation a train reply carries (``strategy.evaluate_with_train``), decoded
    like an evaluate reply; None when the reply carries none (a refusal before it, an
    error). Checked on its own: a bad evaluation does not reject the training update."""
    if reply.has_error() or S.EVALUATION not in reply.content.config_records:
        return None
    node = int(reply.metadata.src_node_id)
    update = S.SiteUpdate(node_id=node, site=identities.name(node) or f"node-{node}", status=S.REJECTED)
    try:
        info = reply.content.config_records.get(S.SITE)
        if info is None or not isinstance(info.get(S.SITE_ID), str):
            raise BadReply("the reply has no 'site' record with a site_id")
        update.site = identities.resolve(node, info[S.SITE_ID])
        if info.get(S.NONCE) != nonce:
            raise BadReply("it does not carry this round's nonce (a replayed or stale reply)")
        evaluation = reply.content.config_records[S.EVALUATION]
        metrics = _json(evaluation, S.METRICS_JSON)
        if metrics is None:
            raise BadReply(f"the evaluation has no {S.METRICS_JSON}")
        _decode_results(metrics, evaluation, update)
        update.status = "ok"
    except BadReply as err:
        update.reason = f"evaluation: {err}"
    return update


def _decode_results(metrics: Mapping[str, Any], info, update: S.SiteUpdate) -> None:
    """Metrics (with the example count) and the evaluation's JSON fields, into ``update``."""
    update.metrics = _numbers(metrics, "metrics")
    n = update.metrics.get(S.NUM_EXAMPLES, 0.0)
    if n < 0 or n != int(n):
        raise BadReply(f"num-examples {n} is not a count")
    update.num_examples = int(n)
    update.fairness = _json(info, S.FAIRNESS_JSON)
    local = _json(info, S.LOCAL_METRICS_JSON)
    update.local_metrics = _numbers(local, "local_metrics_json") if local is not None else None
    audit = _json(info, S.AUDIT_JSON)
    update.audit = _numbers(audit, S.AUDIT_JSON) if audit is not None else None
    benefit = _json(info, S.BENEFIT_JSON)
    if benefit is not None:
        unknown = [m for m in benefit if m not in S.BENEFIT_MODELS]
        if unknown or not all(isinstance(v, dict) for v in benefit.values()):
            raise BadReply(f"{S.BENEFIT_JSON} must map {', '.join(S.BENEFIT_MODELS)} to metrics")
        update.benefit = {m: _numbers(v, S.BENEFIT_JSON) for m, v in benefit.items()}


def check_declared_arrays(record, expected: Mapping[str, tuple[tuple[int, ...], str]],
                          allow_lower_rank: bool = False) -> None:
    """Keys, declared shapes, dtypes and byte sizes of an ArrayRecord against the
    expected state, without decoding a tensor: an oversized array is refused unread."""
    from fedcare.strategies.screening import shape_ok

    keys = list(record.keys())
    unexpected = [k for k in keys if k not in expected]
    if unexpected:
        raise BadReply(f"unexpected array {unexpected[0]}")
    missing = [k for k in expected if k not in record]
    if missing:
        raise BadReply(f"missing array {missing[0]}")
    for key, (shape, dtype) in expected.items():
        arr = record[key]
        got = tuple(int(d) for d in arr.shape)
        if not shape_ok(key, got, tuple(shape), allow_lower_rank):
            raise BadReply(f"array {key} declares shape {got}, expected {tuple(shape)}")
        if str(arr.dtype) != dtype:
            raise BadReply(f"array {key} declares dtype {arr.dtype}, expected {dtype}")
        limit = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + NPY_HEADER_SLACK
        if len(arr.data) > limit:
            raise BadReply(f"array {key} carries {len(arr.data)} bytes, more than its shape allows ({limit})")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadReply(f"{name} is not a string")
    return value[:2000]


def _numbers(values: Mapping[str, Any], name: str) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not isinstance(k, str):
            raise BadReply(f"{name}: {k!r} is not a number")
        out[k] = float(v)
    return out


def _json(info, key: str) -> dict | None:
    if key not in info:
        return None
    raw = info[key]
    if not isinstance(raw, str) or len(raw) > MAX_JSON_CHARS:
        raise BadReply(f"{key} is not a JSON string of at most {MAX_JSON_CHARS} characters")
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise BadReply(f"{key} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise BadReply(f"{key} is not a JSON object")
    return value
