"""Secure aggregation: what it costs and what it changes (issue 22).

1. cost: round time and bytes per site, plain FedAvg against secure aggregation, at 4, 10
   and 50 sites, through the real round loop and ClientApp handlers in one process
   (InProcessGrid: the same Flower messages, no SuperLink/Ray; heart-disease-virtual),
   with the task's own local steps and with 1 local step (so the protocol is not hidden
   behind training). Medians over rounds 2..R; a round includes its evaluate exchange.
   Also the protocol alone at a LoRA-sized update (fedcare/secagg_local.py). With
   ``--simulation``: the same plain/secure rounds as a real Flower simulation
   (``fedcare simulate``: SuperLink, Ray) at 4 and 10 sites.
2. accuracy: heart-disease (the 4 hospitals), the same seeds: plain FedAvg, secure,
   secure with distributed DP at epsilon 8, and server-side client-level DP at epsilon 8.

    python3 bench/secure_aggregation.py [--quick] [--simulation]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_federated, write_json  # noqa: E402

from fedcare import secagg as SA  # noqa: E402
from fedcare.config import RunConfig  # noqa: E402
from fedcare.secagg_local import run_local  # noqa: E402


def round_cost(sites: int, secure: bool, rounds: int, workdir: str, steps: int = 0) -> dict:
    flat = {"task": "heart-disease-virtual", "sites": sites, "rounds": rounds, "secagg.enabled": secure,
            **({"train.local_steps": steps} if steps else {})}
    cfg = RunConfig.from_flat(flat)
    cfg.site.ledger_dir = workdir
    rep = run_federated(cfg.validate(), f"sqlite:///{workdir}/cost-{sites}-{secure}-{steps}.db")
    later = rep["rounds"][1:] or rep["rounds"]
    times = [r["duration_s"] for r in later]   # train, (secure exchanges,) aggregation, evaluate, store
    per_site = [r["metrics"]["update_bytes_per_site"] for r in later]
    return {"sites": sites, "secure": secure, "local_steps": cfg.train.local_steps, "round_s": statistics.median(times),
            "bytes_per_site": statistics.median(per_site),
            "survivors": later[-1]["metrics"].get("secagg_survivors")}


def simulation_cost(sites: int, secure: bool, rounds: int, workdir: str) -> dict:
    """One ``fedcare simulate`` run (real SuperLink and Ray simulation); median round."""
    db = f"sqlite:///{workdir}/sim-{sites}-{secure}.db"
    run = [sys.executable, "-c", "from fedcare.cli import main; main()"]
    out = subprocess.run([*run, "simulate", "--quiet", "--db", db, "--task", "heart-disease-virtual",
                          "--sites", str(sites), "--rounds", str(rounds), "--set", f"secagg.enabled={secure}"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_id = re.search(r"run (run-\S+) completed", out.stdout).group(1)
    rep = json.loads(subprocess.run([*run, "report", run_id, "--db", db, "--json"], capture_output=True,
                                    text=True, check=True).stdout)
    later = rep["rounds"][1:]
    return {"sites": sites, "secure": secure, "round_s": statistics.median(r["duration_s"] for r in later),
            "bytes_per_site": statistics.median(r["metrics"]["update_bytes_per_site"] for r in later)}


def protocol_only(sites: int, dim: int) -> dict:
    p = SA.Params(clip=1.0, bits=16, degree=SA.auto_degree(sites), threshold=SA.auto_degree(sites) // 2 + 1,
                  weight_cap=1024, noise_mu=0.0, min_in_sum=2)
    rng = np.random.default_rng(0)
    inputs = {i: SA.encode_input(rng.normal(0, 0.01, dim), 100, p, rng) for i in range(sites)}
    run = run_local(inputs, p)
    return {"sites": sites, "dim": dim, "degree": p.degree, "site_s": run.site_s,
            "coordinator_s": run.coordinator_s, "bytes_per_site": run.bytes_per_site, "plain_bytes": 4 * dim}


def accuracy(settings: dict[str, dict], rounds: int, seeds: list[int], workdir: str) -> list[dict]:
    out = []
    for name, extra in settings.items():
        accs = []
        for seed in seeds:
            cfg = RunConfig.from_flat({"task": "heart-disease", "rounds": rounds, "seed": seed, **extra})
            cfg.site.ledger_dir = workdir
            rep = run_federated(cfg.validate(), f"sqlite:///{workdir}/acc-{name}-{seed}.db")
            accs.append(rep["final"]["metrics"]["accuracy"])
            eps = ((rep.get("secure_aggregation") or {}).get("epsilon")
                   or (rep.get("client_privacy") or {}).get("epsilon"))
        out.append({"setting": name, "accuracy": statistics.fmean(accs), "accuracies": accs, "epsilon": eps})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and seeds")
    ap.add_argument("--simulation", action="store_true", help="also time real Flower simulations")
    args = ap.parse_args()
    rounds, seeds = (3, [1]) if args.quick else (5, [1, 2, 3])
    with tempfile.TemporaryDirectory() as work:
        cost = [round_cost(n, secure, 3, work, steps) for steps in (0, 1) for n in (4, 10, 50)
                for secure in (False, True)]
        proto = [protocol_only(n, d) for n in (4, 10, 50) for d in (14, 100_000)]
        sim = [simulation_cost(n, secure, 3, work) for n in (4, 10) for secure in (False, True)] \
            if args.simulation else []
        acc = accuracy({
            "plain FedAvg": {},
            "secure": {"secagg.enabled": True},
            "secure + distributed DP eps 8": {"secagg.enabled": True, "secagg.epsilon": 8.0,
                                              "secagg.min_sites_in_sum": 4},
            "client-level DP eps 8 (server noise)": {"dp.level": "client", "dp.epsilon": 8.0},
        }, rounds, seeds, work)
    rows = []
    for steps in sorted({c["local_steps"] for c in cost}, reverse=True):
        for n in (4, 10, 50):
            plain, sec = (next(c for c in cost if c["sites"] == n and c["secure"] is s and c["local_steps"] == steps)
                          for s in (False, True))
            rows.append([n, steps, plain["round_s"], sec["round_s"], sec["round_s"] / plain["round_s"],
                         plain["bytes_per_site"], sec["bytes_per_site"],
                         sec["bytes_per_site"] / plain["bytes_per_site"]])
    print("\nround loop in process (heart-disease-virtual, 14 parameters), median of rounds 2-3")
    t1 = print_table(["sites", "local steps", "plain s", "secure s", "x", "plain B/site", "secure B/site", "x"],
                     rows)
    print("\nprotocol alone (fedcare/secagg_local.py): seconds per site and at the coordinator, bytes per site")
    t2 = print_table(["sites", "params", "degree", "site s", "coordinator s", "B/site", "plain B", "x"],
                     [[p["sites"], p["dim"], p["degree"], p["site_s"], p["coordinator_s"], p["bytes_per_site"],
                       p["plain_bytes"], p["bytes_per_site"] / p["plain_bytes"]] for p in proto])
    tables = [t1, t2]
    if sim:
        print("\nreal Flower simulation (fedcare simulate, Ray; heart-disease-virtual), median of rounds 2-3")
        tables.append(print_table(["sites", "plain s", "secure s", "x", "plain B/site", "secure B/site"], [
            [n, p["round_s"], s_["round_s"], s_["round_s"] / p["round_s"], p["bytes_per_site"], s_["bytes_per_site"]]
            for n in (4, 10) for p, s_ in [[next(c for c in sim if c["sites"] == n and c["secure"] is b)
                                             for b in (False, True)]]]))
    print(f"\nheart-disease accuracy, {rounds} rounds, seeds {seeds} (mean)")
    t3 = print_table(["setting", "accuracy", "epsilon"], [[a["setting"], a["accuracy"], a["epsilon"]] for a in acc])
    path = write_json("secure_aggregation", {"round_loop": cost, "protocol": proto, "simulation": sim,
                                             "accuracy": acc, "rounds": rounds, "seeds": seeds,
                                             "tables": [*tables, t3]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
