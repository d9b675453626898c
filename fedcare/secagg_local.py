"""Both sides of secure aggregation in one process, messages passed as Python values:
what the protocol tests and the protocol-only bench run (the Flower round loop passes
the same values in messages, server/secagg.py)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from fedcare import secagg as SA
from fedcare.client.secagg import SiteSession
from fedcare.strategies.secagg import Coordinator


@dataclass
class LocalRun:
    total: np.ndarray                       # the unmasked sum (uint32)
    survivors: list[int]
    seen: dict[str, list] = field(default_factory=dict)   # everything the coordinator received
    bytes_per_site: float = 0.0             # sent by one site, averaged (keys, shares, input, reveal)
    site_s: float = 0.0                     # seconds of protocol work per site, averaged
    coordinator_s: float = 0.0


def run_local(inputs: dict[int, np.ndarray], params: SA.Params, drop_after_shares: set[int] = frozenset(),
              drop_after_mask: set[int] = frozenset()) -> LocalRun:
    """Run one round over ``inputs`` (node -> encoded input). Sites in ``drop_after_shares``
    vanish before sending their masked input; those in ``drop_after_mask`` after it."""
    round_key = os.urandom(16)
    sessions = {node: SiteSession(params, round_key) for node in inputs}
    seen: dict[str, list] = {"keys": [], "shares": [], "masked": [], "revealed": []}
    sent = {node: 0 for node in inputs}
    site_s = {node: 0.0 for node in inputs}

    def timed(node, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        site_s[node] += time.perf_counter() - t
        return out

    keys = {node: timed(node, s.advertise, inputs[node]) for node, s in sessions.items()}
    for node, (c, s) in keys.items():
        sent[node] += len(c) + len(s)
    seen["keys"] = list(keys.values())
    t0 = time.perf_counter()
    coord = Coordinator(params, round_key, keys)
    coord_s = time.perf_counter() - t0
    shares = {}
    for node, s in sessions.items():
        i, n, neigh = coord.key_request(node)
        shares[node] = timed(node, s.share_keys, i, n, neigh)
        sent[node] += sum(len(v) for v in shares[node].values())
    seen["shares"] = list(shares.values())
    t0 = time.perf_counter()
    inbox = coord.route_shares(shares)
    coord_s += time.perf_counter() - t0
    masked = {node: timed(node, sessions[node].mask, inbox[node]) for node in inbox if node not in drop_after_shares}
    for node, y in masked.items():
        sent[node] += y.nbytes
    seen["masked"] = list(masked.values())
    survivors = coord.collect_masked(masked)
    revealed = {}
    for node in survivors:
        if node in drop_after_mask:
            continue
        revealed[node] = timed(node, sessions[node].unmask, *coord.unmask_request(node))
        sent[node] += sum(len(v) for part in revealed[node].values() for v in part.values())
    seen["revealed"] = list(revealed.values())
    t0 = time.perf_counter()
    total = coord.unmask(revealed)
    coord_s += time.perf_counter() - t0
    return LocalRun(total=total, survivors=survivors, seen=seen,
                    bytes_per_site=float(np.mean(list(sent.values()))),
                    site_s=float(np.mean(list(site_s.values()))), coordinator_s=coord_s)
