"""A securely aggregated round in the round loop: the train replies brought public keys
(no arrays); three more exchanges (share keys, mask, unmask; client/secagg_app.py)
give the coordinator the sum of the survivors' inputs, from which the new global
state is the received global plus the weighted mean of the sites' clipped updates.

A site that fails or refuses a later step is recorded as such; its update is in the
sum only if its masked input arrived. If too few shares come back, the round is not
aggregated and the global model stays as it was (an event says why).
"""
from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedcare import schemas as S
from fedcare import secagg as SA
from fedcare.accounting import secagg_epsilon
from fedcare.secagg import MASK, MASKED, RECORD, SHARE, UNMASK, round_key
from fedcare.records import from_array_record
from fedcare.strategies.secagg import Coordinator, SecAggFailed

from .replies import BadReply, check_declared_arrays


def secure_aggregate(fed, rnd: int, accepted: list[S.SiteUpdate], sites: list[S.SiteRound],
                     shared: dict[str, np.ndarray], nonce: str) -> tuple[dict | None, dict[str, float]]:
    """(new shared state or None, round metrics) from the accepted key replies."""
    cfg = fed.cfg
    keys_order = sorted(shared)
    dim = int(sum(np.asarray(shared[k]).size for k in keys_order))
    p = SA.run_params(cfg, fed.task, dim)
    rows = {r.node_id: r for r in sites}
    keys = {}
    for u in accepted:
        rec = u.message.content.config_records.get(RECORD)
        c, s = (rec.get("c_pk"), rec.get("s_pk")) if rec is not None else (None, None)
        if isinstance(c, bytes) and isinstance(s, bytes) and len(c) == len(s) == SA.KEY_BYTES:
            keys[u.node_id] = (c, s)
        else:
            _drop(rows, u.node_id, S.REJECTED, "secure aggregation: the reply carries no valid public keys")
    metrics = {"secagg_threshold": float(p.threshold), "secagg_degree": float(min(p.degree, max(len(keys) - 1, 1))),
               "secagg_survivors": 0.0}
    coord = Coordinator(p, round_key(cfg.runtime.run_id, rnd, nonce), keys)
    sent = {node: 2 * SA.KEY_BYTES for node in keys}
    timeout = cfg.strategy.round_timeout

    def exchange(action: str, payload: dict[int, dict]) -> dict[int, Message]:
        msgs = [Message(RecordDict({S.CONFIG: ConfigRecord({S.NONCE: nonce, "server-round": rnd}),
                                    RECORD: ConfigRecord(body)}),
                        dst_node_id=node, message_type=f"train.{action}", group_id=str(rnd))
                for node, body in payload.items()]
        got = {}
        by_node = {r.metadata.src_node_id: r for r in fed._send_and_collect(msgs, timeout)}
        for node in payload:
            reply = by_node.get(node)
            why = _problem(reply, nonce)
            if why:
                _drop(rows, node, S.REFUSED if why.startswith("refused") else S.FAILED,
                      f"secure aggregation ({action}): {why}")
            else:
                got[node] = reply
        return got

    try:
        requests = {}
        for node in keys:
            i, n, neigh = coord.key_request(node)
            requests[node] = {"index": i, "n": n, "idx": list(neigh), "c_pk": [c for c, _ in neigh.values()],
                              "s_pk": [s for _, s in neigh.values()]}
        replies = exchange(SHARE, requests)
        shares = {}
        for node, r in replies.items():
            shares[node] = _pairs(r, "dst", "sealed")
            sent[node] += sum(len(v) for v in shares[node].values())
        inbox = coord.route_shares(shares)
        replies = exchange(MASK, {node: {"src": list(got), "sealed": list(got.values())}
                                  for node, got in inbox.items()})
        masked = {}
        for node, r in replies.items():
            try:
                record = r.content.array_records.get(S.ARRAYS)
                if record is None:
                    raise BadReply("no masked input")
                check_declared_arrays(record, {MASKED: ((dim + 1,), "uint32")})
                masked[node] = from_array_record(record)[MASKED]
                sent[node] += masked[node].nbytes
            except BadReply as err:
                _drop(rows, node, S.REJECTED, f"secure aggregation: {err}")
        survivors = coord.collect_masked(masked)
        metrics["secagg_survivors"] = float(len(survivors))
        if len(survivors) < p.min_in_sum:
            raise SecAggFailed(f"{len(survivors)} masked inputs, fewer than the {p.min_in_sum} a sum must hold")
        replies = exchange(UNMASK, {node: dict(zip(("survivors", "dropped", "n_in_sum"), coord.unmask_request(node)))
                                    for node in survivors})
        revealed = {}
        for node, r in replies.items():
            revealed[node] = {"b": _pairs(r, "b_idx", "b"), "s": _pairs(r, "s_idx", "s")}
            sent[node] += sum(len(v) for part in revealed[node].values() for v in part.values())
        total = coord.unmask(revealed)
    except SecAggFailed as err:
        fed.store.add_event(fed.run_id, "secagg_failed", f"round {rnd}: {err}; global model unchanged")
        return None, metrics
    for node, row in rows.items():   # what each site sent over the round's four exchanges
        if node in sent:
            row.update_bytes = sent[node]
    for node, row in rows.items():
        if row.accepted and node not in survivors:
            _drop(rows, node, S.FAILED, "secure aggregation: its masked input is not in the sum")
    mean, weight = SA.decode_sum(total, p)
    metrics["secagg_weight"] = float(weight)
    losses = [(u.train_loss, u.num_examples) for u in accepted if u.node_id in survivors and u.train_loss is not None]
    if losses and sum(n for _, n in losses):
        metrics[S.TRAIN_LOSS] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    if p.noise_mu > 0:
        metrics["secagg_epsilon"] = secagg_epsilon(p, dim, rnd, cfg.dp.delta)
    delta = SA.unflatten(mean, shared, keys_order)
    return {k: (np.asarray(shared[k], np.float64) + delta[k]).astype(np.asarray(shared[k]).dtype)
            for k in keys_order}, metrics


def _problem(reply: Message | None, nonce: str) -> str:
    if reply is None:
        return "no reply"
    if reply.has_error():
        return f"site error: {reply.error.reason}"
    info = reply.content.config_records.get(S.SITE)
    if info is None:
        return "no site record"
    if info.get(S.STATUS) == "refused":
        return f"refused: {str(info.get(S.REASON, ''))[:400]}"
    if info.get(S.NONCE) != nonce:
        return "stale nonce"
    return ""


def _pairs(reply: Message, idx: str, values: str) -> dict[int, bytes]:
    """{index: bytes} from two parallel lists of a step's reply; {} when malformed (the
    protocol then lacks that site's part, as if it had dropped)."""
    rec = reply.content.config_records.get(RECORD)
    if rec is None:
        return {}
    ids, vals = rec.get(idx, []), rec.get(values, [])
    if not (isinstance(ids, list) and isinstance(vals, list) and len(ids) == len(vals)
            and all(isinstance(j, int) and not isinstance(j, bool) for j in ids)
            and all(isinstance(v, bytes) and len(v) <= 4096 for v in vals)):
        return {}
    return {int(j): bytes(v) for j, v in zip(ids, vals)}


def _drop(rows: dict, node: int, status: str, reason: str) -> None:
    row = rows.get(node)
    if row is not None and row.accepted:
        row.status, row.reason = status, reason
