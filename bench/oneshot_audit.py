"""One-shot empirical privacy estimation at the hospital level (Andrew et al., ICLR 2024;
fedcare/oneshot_audit.py) over fedcare's aggregation paths, in process: plain FedAvg,
secure aggregation without noise, server-side client-level DP at epsilon 8 (PRV and RDP
calibration), secure aggregation with distributed DP at epsilon 8 (Skellam noise from
every client, calibrated to a sum of all of them). 10 real sites training a quadratic
objective each, 200 canary clients in every round, 2000 fresh directions, 10,000
parameters, 5 rounds, clip 1, delta 1e-5; seeds 0..S-1.

    python3 bench/oneshot_audit.py [--seeds 3] [--protocol]

``--protocol`` adds the distributed-DP row with the full masking protocol
(fedcare/secagg_local.py) instead of the ring sum it returns (slow: 210 sites).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from fedcare import oneshot_audit as O  # noqa: E402
from fedcare import secagg as SA  # noqa: E402
from fedcare.accounting import secagg_epsilon  # noqa: E402
from fedcare.config import RunConfig  # noqa: E402
from fedcare.strategies.client_dp import client_dp_of  # noqa: E402

DIM, ROUNDS, CANARIES, FRESH, REAL, DELTA = 10_000, 5, 200, 2000, 10, 1e-5


def settings(protocol: bool) -> list[tuple[str, object, float | None]]:
    """(name, path, the accountant's epsilon or None)."""
    n = REAL + CANARIES
    secure = RunConfig.from_flat({"secagg.enabled": True, "secagg.clip": 1.0, "rounds": ROUNDS})
    ddp = RunConfig.from_flat({"secagg.enabled": True, "secagg.epsilon": 8.0, "dp.delta": DELTA,
                               "secagg.clip": 1.0, "rounds": ROUNDS, "secagg.min_sites_in_sum": n})
    out = [("plain FedAvg", O.fedavg_path, None), ("secure, no noise", O.secagg_path(secure, n, DIM), None)]
    for acc in ("prv", "rdp"):
        cfg = RunConfig.from_flat({"dp.level": "client", "dp.epsilon": 8.0, "dp.delta": DELTA,
                                   "dp.max_grad_norm": 1.0, "rounds": ROUNDS, "dp.accountant": acc})
        out.append((f"client-level DP eps 8 ({acc})", O.client_dp_path(cfg), client_dp_of(cfg).epsilon(ROUNDS)))
    ddp_eps = secagg_epsilon(SA.params_of(ddp, n, DIM), DIM, ROUNDS, DELTA)
    out.append(("secure + distributed DP eps 8", O.secagg_path(ddp, n, DIM), ddp_eps))
    if protocol:
        out.append(("secure + distributed DP eps 8 (protocol)", O.secagg_path(ddp, n, DIM, protocol=True), ddp_eps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--protocol", action="store_true")
    args = ap.parse_args()
    rows, records = [], []
    for name, path, accountant in settings(args.protocol):
        ests, t0 = [], time.perf_counter()
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            ests.append(O.audit(path, O.QuadraticSites.make(REAL, DIM, rng), ROUNDS, CANARIES, FRESH, 1.0,
                                DELTA, rng))
        secs = (time.perf_counter() - t0) / args.seeds
        eps = [e.epsilon for e in ests]
        records.append({"setting": name, "accountant_epsilon": accountant, "seconds_per_run": secs,
                        "estimates": [e.__dict__ for e in ests]})
        rows.append([name, accountant if accountant is not None else "none", statistics.mean(eps),
                     ", ".join(f"{e:.2f}" for e in eps),
                     ", ".join(f"[{e.epsilon_low:.2f}, {e.epsilon_high:.2f}]" for e in ests),
                     statistics.mean(e.mu for e in ests), secs])
    table = print_table(["setting", "accountant eps", "mean estimate", "per seed", "95% interval per seed",
                         "mu", "s/run"], rows)
    write_json("oneshot_audit", {"dim": DIM, "rounds": ROUNDS, "canaries": CANARIES, "fresh": FRESH,
                                 "real_sites": REAL, "delta": DELTA, "seeds": args.seeds, "rows": records,
                                 "table": table})


if __name__ == "__main__":
    main()
