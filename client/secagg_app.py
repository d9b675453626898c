"""Secure aggregation in the ClientApp's messages (the protocol is client/secagg.py).

The train message trains as always, but its reply carries no arrays: the site encodes
its update (trained minus received, clipped, quantized, weighted, noised under
distributed DP), keeps it in the context, and answers with two public keys. Three
more messages of the same round follow (``STEPS``): share keys, mask, unmask. Every
step echoes the round's nonce; the session refuses steps out of order.
"""
from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcare import schemas as S
from fedcare import secagg as SA
from fedcare.accounting import secagg_epsilon
from fedcare.secagg import MASK, MASKED, RECORD, SHARE, UNMASK, round_key
from fedcare.errors import PolicyRefusal
from fedcare.records import to_array_record

from .secagg import SiteSession

STATE = "secagg"       # context.state key of the session


def update_vector(site, shared: dict, received: dict) -> tuple[np.ndarray, list[str]]:
    """The site's update (trained minus received) over the global shared keys, LoRA
    factors of a lower rank zero-padded to the run's rank; keys the site does not send
    contribute 0."""
    keys = sorted(received)
    if site.lora_rank and site.lora_rank != site.cfg.lora.r:
        from fedcare.strategies.hetero import pad_to_rank, rank_scale

        scale = rank_scale(site.cfg)
        shared, received = pad_to_rank(shared, site.cfg.lora.r, scale), pad_to_rank(received, site.cfg.lora.r, scale)
    delta = {k: np.asarray(shared[k], np.float64) - np.asarray(received[k], np.float64) if k in shared
             else np.zeros(np.shape(received[k])) for k in keys}
    return SA.flatten(delta, keys), keys


def begin(msg: Message, context: Context, site, policy, rnd: int, shared: dict, received: dict,
          num_examples: int) -> tuple[RecordDict, int, float | None]:
    """Encode and keep this round's input; (the reply's records but SITE/METRICS, bytes
    sent, the distributed-DP epsilon of this site's rounds 1..rnd or None without it)."""
    vec, _ = update_vector(site, shared, received)
    p = SA.run_params(site.cfg, site.task, vec.size)
    weight = max(1, min(int(num_examples), p.weight_cap))
    encoded = SA.encode_input(vec, weight, p, np.random.default_rng())
    nonce = str(msg.content[S.CONFIG].get(S.NONCE, ""))
    session = SiteSession(p, round_key(site.cfg.runtime.run_id, rnd, nonce),
                          getattr(policy, "min_sites_in_sum", 0))
    c_pk, s_pk = session.advertise(encoded)
    context.state[STATE] = ConfigRecord({"session": session.to_json(), "nonce": nonce, "round": rnd})
    ddp = secagg_epsilon(p, vec.size, rnd, site.cfg.dp.delta) if p.noise_mu > 0 else None
    return RecordDict({RECORD: ConfigRecord({"c_pk": c_pk, "s_pk": s_pk})}), len(c_pk) + len(s_pk), ddp


def step(msg: Message, context: Context, site) -> RecordDict:
    """One later step; the reply's records but SITE. Raises PolicyRefusal."""
    kept = context.state.get(STATE)
    nonce = str(msg.content[S.CONFIG].get(S.NONCE, ""))
    if kept is None or kept["nonce"] != nonce:
        raise PolicyRefusal("secure aggregation: no round of this nonce is in progress at this site")
    session = SiteSession.from_json(kept["session"])
    got = msg.content.config_records.get(RECORD) or ConfigRecord({})
    action = msg.metadata.message_type.partition(".")[2]
    try:
        if action == SHARE:
            keys = {int(j): (bytes(c), bytes(s)) for j, c, s in zip(got["idx"], got["c_pk"], got["s_pk"])}
            out = session.share_keys(int(got["index"]), int(got["n"]), keys)
            records = {RECORD: ConfigRecord({"dst": list(out), "sealed": list(out.values())})}
            sent = sum(len(v) for v in out.values())
        elif action == MASK:
            y = session.mask({int(j): bytes(c) for j, c in zip(got["src"], got["sealed"])})
            records = {S.ARRAYS: to_array_record({MASKED: y})}
            sent = y.nbytes
        elif action == UNMASK:
            rev = session.unmask([int(j) for j in got["survivors"]], [int(j) for j in got["dropped"]],
                                 int(got["n_in_sum"]))
            records = {RECORD: ConfigRecord({"b_idx": list(rev["b"]), "b": list(rev["b"].values()),
                                             "s_idx": list(rev["s"]), "s": list(rev["s"].values())})}
            sent = sum(len(v) for part in rev.values() for v in part.values())
        else:
            raise PolicyRefusal(f"secure aggregation: unknown step {action!r}")
    except (KeyError, TypeError, ValueError):
        raise PolicyRefusal(f"secure aggregation: the {action} message is malformed") from None
    finally:
        context.state[STATE] = ConfigRecord({**dict(kept.items()), "session": session.to_json()})
    return RecordDict({**records, S.METRICS: MetricRecord({S.UPDATE_BYTES: sent})})
