"""Per-round wall time of the same heart-disease run in simulation and in deployment.

Simulation: ``fedcare simulate`` (Flower's simulation runtime keeps each virtual
site's ClientApp in a long-lived Ray worker). Deployment: a SuperLink with TLS and
SuperNode authentication plus one SuperNode per centre on loopback, ``fedcare server
run``; flwr 1.41 starts a fresh ``flwr-clientapp`` process for every message (train and
evaluate), which imports flwr, torch and fedcare and rebuilds the model each time.
Deployment with site workers (``fedcare site start --worker``): the same, but the
per-message ClientApp only forwards the message to a long-lived worker per site.

Round times come from the store (``started_at``/``ended_at`` of each committed round).
The cold-start cost of one ClientApp process is measured separately (a fresh Python
importing fedcare's ClientApp module). Writes JSON and prints a table::

    python bench/deploy_overhead.py --rounds 3 --local-steps 100 --out bench/results/deploy_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CENTRES = {"cleveland": "processed.cleveland.data", "hungarian": "processed.hungarian.data",
           "switzerland": "processed.switzerland.data", "va": "processed.va.data"}


def fedcare(*args: str, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([shutil.which("fedcare") or "fedcare", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"fedcare {' '.join(args[:2])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def round_times(db: str, run_id: str) -> list[float]:
    from fedcare.server.store import Store

    with Store(db) as store:
        return [r["ended_at"] - r["started_at"] for r in store.rounds(run_id)]


def run_id_of(stdout: str) -> str:
    return next(w.rstrip(":") for w in stdout.split() if w.startswith("run-"))


def simulation(work: Path, sets: list[str], rounds: int) -> dict:
    db = f"sqlite:///{work / 'sim.db'}"
    env = {**os.environ, "FEDCARE_WORKDIR": str(work / "runs")}
    t0 = time.time()
    out = fedcare("simulate", "--task", "heart-disease", "--rounds", str(rounds), "--db", db, "--quiet", *sets, env=env)
    total = time.time() - t0
    return {"total_s": total, "round_s": round_times(db, run_id_of(out.stdout))}


def deployment(work: Path, sets: list[str], rounds: int, worker: bool = False) -> dict:
    from fedcare.certs import create_site_keys, init_server
    from fedcare.flower import free_port
    from fedcare.server.deploy import (SiteSpec, TlsFiles, register_site, start_superlink, start_supernode,
                                       start_worker, wait_joined, write_connection)

    tls = init_server(work / "tls", ["localhost"], ["127.0.0.1"])
    home, port = work / "flwr-home", free_port()
    db = f"sqlite:///{work / 'deploy.db'}"
    env = {**os.environ, "FEDCARE_FLWR_HOME": str(home), "FEDCARE_WORKDIR": str(work / "runs")}
    procs = []
    t_setup = time.time()
    link = start_superlink(TlsFiles.from_dir(work / "tls"), work / "superlink.db", work / "logs", port=port,
                           flwr_home=home)
    try:
        write_connection(home, f"127.0.0.1:{port}", tls.ca_cert)
        for site, file in CENTRES.items():
            data = work / "sites" / site
            data.mkdir(parents=True)
            shutil.copy(ROOT / "data" / "heart-disease" / file, data)
            keys = create_site_keys(site, work / "keys")
            register_site(keys.public_key, home)
            sock = None
            if worker:
                sock = work / f"{site}.sock"
                procs.append(start_worker(sock, work / "logs", home))
            spec = SiteSpec(site, keys.private_key, data_path=data, ledger=work / "sites" / f"{site}.ledger.db",
                            port=free_port(), worker=sock)
            procs.append(start_supernode(spec, f"127.0.0.1:{port}", tls.ca_cert, work / "logs", flwr_home=home))
        for p in procs:
            if "supernode" in p.name:
                wait_joined(p, 300)
        setup = time.time() - t_setup
        t0 = time.time()
        out = fedcare("server", "run", "--task", "heart-disease", "--rounds", str(rounds), "--db", db, "--quiet",
                      *sets, env=env)
        total = time.time() - t0
    finally:
        for p in procs:
            p.stop()
        link.stop()
    return {"setup_s": setup, "total_s": total, "round_s": round_times(db, run_id_of(out.stdout))}


def clientapp_cold_start(repeats: int = 3) -> list[float]:
    """Seconds for a fresh interpreter to import fedcare's ClientApp (flwr + torch + task)."""
    code = "import fedcare.client.app, fedcare.models.heart_disease"
    times = []
    for _ in range(repeats):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.time() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "first_s": times[0],
            "rounds": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy_overhead.json")
    args = ap.parse_args()
    sets = ["--set", f"train.local_steps={args.local_steps}"]
    with tempfile.TemporaryDirectory(prefix="fedcare-overhead-") as tmp:
        work = Path(tmp)
        (work / "sim").mkdir()
        (work / "dep").mkdir()
        (work / "worker").mkdir()
        cold = clientapp_cold_start()
        sim = simulation(work / "sim", sets, args.rounds)
        dep = deployment(work / "dep", sets, args.rounds)
        wrk = deployment(work / "worker", sets, args.rounds, worker=True)
    result = {
        "task": "heart-disease", "sites": 4, "rounds": args.rounds, "local_steps": args.local_steps,
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
        "clientapp_cold_start_s": cold,
        "simulation": {**sim, **summary(sim["round_s"])},
        "deployment": {**dep, **summary(dep["round_s"])},
        "deployment_worker": {**wrk, **summary(wrk["round_s"])},
    }
    result["overhead_per_round_s"] = result["deployment"]["median_s"] - result["simulation"]["median_s"]
    result["overhead_per_round_worker_s"] = (result["deployment_worker"]["median_s"]
                                             - result["simulation"]["median_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"heart-disease, 4 sites, {args.rounds} rounds x {args.local_steps} local steps "
          f"(load average {result['load_average'][0]:.1f} on {result['cpus']} CPUs)")
    print(f"{'mode':<18} {'median round s':>15} {'first round s':>14} {'run total s':>12}")
    for mode in ("simulation", "deployment", "deployment_worker"):
        r = result[mode]
        print(f"{mode:<18} {r['median_s']:>15.2f} {r['first_s']:>14.2f} {r['total_s']:>12.1f}")
    print(f"overhead per round (deployment - simulation, median): {result['overhead_per_round_s']:.2f} s; "
          f"with the site worker: {result['overhead_per_round_worker_s']:.2f} s")
    print(f"ClientApp cold start (fresh process importing flwr+torch+fedcare): "
          f"median {statistics.median(cold):.2f} s; 2 per site per round (train + evaluate)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
