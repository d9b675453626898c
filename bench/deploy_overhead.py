"""Per-round wall time of the same run in simulation and in deployment, and where a
deployed round's time goes.

Modes (``--modes``, all by default):

- ``simulation``: ``fedcare simulate`` (Flower's simulation runtime; each virtual site's
  ClientApp lives in a long-lived Ray worker).
- ``in-process``: the same round loop and ClientApp handlers, sites called in the
  bench's own process (no Ray, no SuperLink): a floor for a simulated round, used when
  Ray cannot start on a loaded machine.
- ``per-message``: ``fedcare server start`` + ``fedcare site start --per-message`` on
  loopback: stock flwr, a fresh ``flwr-clientapp`` process for every message.
- ``executor``: the same with ``fedcare site start`` (the site's warm executor).
- ``executor-netns``: the executor deployment with the coordinator and every site in a
  network namespace of its own (tests/netns.py: veth links, 10.231.N.x addresses, TLS
  certificate issued for the coordinator's address). Needs root.

Every deployed mode runs the real CLI (TLS, SuperNode authentication, the sites' own
data folders; for the text task each folder holds exactly the abstracts of the
simulated site of the same name, so both modes train and evaluate the same examples). Round times come from the store; the breakdown of a round uses what the
round loop records: ``compute`` = the slowest accepted site's training time (reported
by the site), ``transfer`` = seconds the server spent pushing the messages and pulling
the replies, ``waiting`` = the slowest site's latency (push to reply) minus those two
(polls, process starts, queueing), ``rest`` = the remainder of the round (evaluation
exchange, aggregation, store). Median and p90 over rounds after the first; the first
round (model and data loading at the sites) is reported on its own.

Every mode runs with ``strategy.evaluate_with_train=true`` (each site evaluates the last
round's model in the train message: one message per site per round) unless
``--separate-evaluation`` asks for an evaluate message per site per round as well.

    python bench/deploy_overhead.py --rounds 4 --local-steps 100
    python bench/deploy_overhead.py --task medical-abstracts --sites 3 --rounds 5 --local-steps 20 \
        --modes simulation,executor --set train.mode=lora     # the MiniLM LoRA text task
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
HEART = {"cleveland": "processed.cleveland.data", "hungarian": "processed.hungarian.data",
         "switzerland": "processed.switzerland.data", "va": "processed.va.data"}
MODES = ("simulation", "in-process", "per-message", "executor", "executor-netns")


def fedcare(*args: str, env: dict, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    out = subprocess.run([*prefix, shutil.which("fedcare") or "fedcare", *args], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"fedcare {' '.join(args[:2])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def run_id_of(stdout: str) -> str:
    return next(w.rstrip(":") for w in stdout.split() if w.startswith("run-"))


def rounds_of(db: str, run_id: str) -> list[dict]:
    """Per round: total seconds and its breakdown (see the module docstring)."""
    from fedcare.server.store import Store

    out = []
    with Store(db) as store:
        for r in store.rounds(run_id):
            sites = [s for s in store.site_rounds(run_id, r["round"]) if s["accepted"]]
            total = r["ended_at"] - r["started_at"]
            compute = max((s["duration_s"] or 0.0 for s in sites), default=0.0)
            latency = max((s["metrics"].get("latency_s", 0.0) for s in sites), default=0.0)
            transfer = r["metrics"].get("push_s", 0.0) + r["metrics"].get("pull_s", 0.0)
            out.append({"round_s": total, "compute_s": compute, "transfer_s": transfer,
                        "waiting_s": max(latency - compute - transfer, 0.0), "rest_s": max(total - latency, 0.0),
                        "accepted": len(sites)})
    return out


class Loopback:
    """Every host is this machine."""

    def addr(self, host: str) -> str:
        return "127.0.0.1"

    def prefix(self, host: str) -> list[str]:
        return []


def simulation(work: Path, task: str, sites: int, sets: list[str], rounds: int, tries: int = 2) -> dict:
    """``fedcare simulate``; on a loaded machine Ray can time out starting, so it is
    tried again (each failure is kept in the result)."""
    env = {**os.environ, "FEDCARE_WORKDIR": str(work / "runs"), "FLWR_TELEMETRY_ENABLED": "0"}
    failures = []
    for attempt in range(tries):
        db = f"sqlite:///{work / f'sim{attempt}.db'}"
        try:
            out = fedcare("simulate", "--task", task, *(["--sites", str(sites)] if task != "heart-disease" else []),
                          "--rounds", str(rounds), "--db", db, "--quiet", *sets, env=env)
        except SystemExit as err:
            failures.append(str(err)[-300:])
            continue
        return {"rounds": rounds_of(db, run_id_of(out.stdout)), "failed_attempts": failures}
    raise SystemExit("fedcare simulate failed every time:\n" + "\n".join(failures))


def site_folders(work: Path, task: str, sites: int, sets: list[str]) -> dict[str, Path]:
    """Each site's own data folder (what a hospital would point `--data` at)."""
    if task == "heart-disease":
        folders = {}
        for site, file in HEART.items():
            folders[site] = work / "data" / site
            folders[site].mkdir(parents=True)
            shutil.copy(ROOT / "data" / "heart-disease" / file, folders[site])
        return folders
    if task == "medical-abstracts":
        return abstracts_folders(work, sites, sets)
    return {f"site-{i}": ROOT / "data" / task for i in range(sites)}   # every site holds the corpus format


def abstracts_folders(work: Path, sites: int, sets: list[str]) -> dict[str, Path]:
    """Each deployed hospital gets exactly the abstracts its simulated twin holds (the
    seeded Dirichlet partition, train and test rows), as a described CSV folder, so both
    modes train and evaluate on the same examples (holding the whole corpus, a site
    would evaluate three times as many)."""
    import pandas as pd

    from fedcare.launch import resolve_config
    from fedcare.models.medical_abstracts import load_corpus, site_rows

    cfg = resolve_config("medical-abstracts", [v for k, v in zip(sets[::2], sets[1::2])], sites=sites)
    ids = [f"site-{i}" for i in range(sites)]
    folders = {}
    for site in ids:
        folder, train, test = site_rows(ids, site, cfg)
        corpus = load_corpus(folder)
        rows = [*train, *test]
        folders[site] = work / "data" / site
        folders[site].mkdir(parents=True)
        pd.DataFrame({"text": [corpus.texts[i] for i in rows],
                      "label": [corpus.class_names[corpus.labels[i]] for i in rows],
                      "split": ["train"] * len(train) + ["test"] * len(test)}).to_csv(
            folders[site] / "abstracts.csv", index=False)
        (folders[site] / "dataset.toml").write_text(
            f'dataset_id = "{site}/abstracts"\nfamily = "text"\nformat = "csv"\nfiles = ["abstracts.csv"]\n'
            '[columns]\ntext = "text"\nlabel = "label"\nsplit = "split"\n')
    return folders


def deployment(work: Path, task: str, sites: int, sets: list[str], rounds: int, executor: bool, hosts) -> dict:
    """`fedcare server start`, one `fedcare site start` per site (on ``hosts``), `fedcare
    server run`; everything is stopped on the way out."""
    from fedcare.certs import create_site_keys, init_server
    from fedcare.flower import free_port
    from netns import Lan

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    coord = hosts.addr("coordinator")
    tls = init_server(work / "tls", ["localhost"], [coord])
    folders = site_folders(work, task, sites, sets)
    keys = {site: create_site_keys(site, work / "keys") for site in folders}
    port, home, db = free_port(), work / "flwr-home", f"sqlite:///{work / 'deploy.db'}"
    procs = []
    lan = hosts if isinstance(hosts, Lan) else Lan([])

    def spawn(host: str, cmd: list[str], log: Path, extra_env: dict | None = None, ready: str = "ready;"):
        proc = subprocess.Popen([*hosts.prefix(host), *cmd], env={**env, **(extra_env or {})},
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        deadline = time.time() + 600
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{' '.join(cmd[:3])} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        return proc

    exe = shutil.which("fedcare") or "fedcare"
    t_setup = time.time()
    try:
        spawn("coordinator", [exe, "server", "start", "--tls-dir", str(work / "tls"), "--host", coord,
                              "--port", str(port), "--database", str(work / "superlink.db"), "--flwr-home", str(home),
                              "--workdir", str(work / "coordinator"),
                              *[a for k in keys.values() for a in ("--register", str(k.public_key))]],
              work / "coordinator.log")
        t_sites = time.time()
        for i, (site, folder) in enumerate(folders.items()):
            host = site if isinstance(hosts, Lan) else "coordinator"
            spawn(host, [exe, "site", "start", "--site-id", site, "--data", str(folder),
                         "--superlink", f"{coord}:{port}", "--root-cert", str(tls.ca_cert),
                         "--node-key", str(keys[site].private_key), "--ledger", str(work / f"{site}.ledger.db"),
                         "--port", str(free_port()), "--workdir", str(work / site), "--task", task,
                         "--threads", "1",   # one core per site, as Ray gives each simulated site
                         *([] if executor else ["--per-message"])],
                  work / f"{site}.log", {"FLWR_HOME": str(work / site / "flwr-home")})
        ready = time.time()
        out = fedcare("server", "run", "--task", task, *(["--sites", str(sites)] if task != "heart-disease" else []),
                      "--rounds", str(rounds), "--db", db, "--quiet", "--flwr-home", str(home), *sets, env=env,
                      prefix=hosts.prefix("coordinator"))
    finally:
        lan.procs = procs
        lan.close()
    return {"setup_s": ready - t_setup, "sites_start_s": ready - t_sites, "rounds": rounds_of(db, run_id_of(out.stdout))}


def in_process(work: Path, task: str, sites: int, sets: list[str], rounds: int) -> dict:
    """The same round loop and handlers with the sites called in this process
    (``InProcessGrid``): no Ray, no SuperLink; the floor a simulated round can reach."""
    from fedcare.launch import resolve_config
    from fedcare.server.federation import run_federation
    from fedcare.server.local_grid import InProcessGrid

    cfg = resolve_config(task, [v for k, v in zip(sets[::2], sets[1::2])],
                         sites=sites if task != "heart-disease" else None, rounds=rounds)
    cfg.runtime.db = f"sqlite:///{work / 'inprocess.db'}"
    run_id = run_federation(InProcessGrid(cfg, cfg.sites), cfg)
    return {"rounds": rounds_of(cfg.runtime.db, run_id)}


def run_mode(mode: str, work: Path, args, sets: list[str]) -> dict:
    if mode == "simulation":
        return simulation(work, args.task, args.sites, sets, args.rounds)
    if mode == "in-process":
        return in_process(work, args.task, args.sites, sets, args.rounds)
    if mode == "executor-netns":
        from netns import Lan

        names = list(site_folders(work / "probe", args.task, args.sites, sets))
        with Lan(["coordinator", *names]) as lan:
            return deployment(work, args.task, args.sites, sets, args.rounds, True, lan)
    return deployment(work, args.task, args.sites, sets, args.rounds, mode == "executor", Loopback())


def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def summarise(res: dict) -> dict:
    later = res["rounds"][1:] or res["rounds"]
    s = {"first_round_s": res["rounds"][0]["round_s"],
         "median_s": statistics.median(r["round_s"] for r in later), "p90_s": p90([r["round_s"] for r in later])}
    for part in ("compute_s", "transfer_s", "waiting_s", "rest_s"):
        s[f"median_{part}"] = statistics.median(r[part] for r in later)
    s["first_over_later"] = s["first_round_s"] / s["median_s"] if s["median_s"] else None
    return {**res, **s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="heart-disease")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=100)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra key=value run settings")
    ap.add_argument("--separate-evaluation", action="store_true",
                    help="evaluate messages of their own every round (default: evaluation rides on train)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    def interrupted(*_):   # stop like Ctrl-C, so every started process and namespace is cleaned up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    modes = [m for m in args.modes.split(",") if m]
    sets = ["--set", f"train.local_steps={args.local_steps}", "--set", f"strategy.min_sites={args.sites}",
            "--set", f"strategy.evaluate_with_train={not args.separate_evaluation}",
            *[a for s in args.sets for a in ("--set", s)]]
    out = args.out or ROOT / "bench" / "results" / f"deploy_overhead_{args.task}.json"
    result = {"task": args.task, "sites": args.sites, "rounds": args.rounds, "local_steps": args.local_steps,
              "evaluation": "separate" if args.separate_evaluation else "with-train",
              "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "modes": {}}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"fedcare-overhead-{mode}-") as tmp:
            work = Path(tmp)
            t0 = time.time()
            try:
                res = run_mode(mode, work, args, sets)
            except SystemExit as err:   # one mode failing keeps the others' numbers
                result["modes"][mode] = {"error": str(err)[-1500:], "load_average": os.getloadavg()}
                print(f"{mode} failed: {str(err)[-500:]}", file=sys.stderr)
                continue
            res["wall_s"] = time.time() - t0
            res["load_average_after"] = os.getloadavg()
        result["modes"][mode] = summarise(res)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))   # written after every mode: a long run keeps what it has
    sim = next((result["modes"][m] for m in ("simulation", "in-process")
                if m in result["modes"] and "error" not in result["modes"][m]), None)
    print(f"{args.task}, {args.sites} sites, {args.rounds} rounds x {args.local_steps} local steps, "
          f"evaluation {result['evaluation']} "
          f"(load average {result['load_average_before'][0]:.1f} before, on {result['cpus']} CPUs; shared machine)")
    print(f"{'mode':<16} {'median s':>9} {'p90 s':>7} {'first s':>8} {'compute':>8} {'waiting':>8} "
          f"{'transfer':>9} {'rest':>6} {'vs reference':>14}")
    for mode, r in result["modes"].items():
        if "error" in r:
            print(f"{mode:<16} failed: {r['error'].splitlines()[-1][:100]}")
            continue
        rel = (f"{r['median_s'] - sim['median_s']:+.2f}s {r['median_s'] / sim['median_s']:.2f}x"
               if sim and r is not sim else "")
        print(f"{mode:<16} {r['median_s']:>9.2f} {r['p90_s']:>7.2f} {r['first_round_s']:>8.2f} "
              f"{r['median_compute_s']:>8.2f} {r['median_waiting_s']:>8.2f} {r['median_transfer_s']:>9.2f} "
              f"{r['median_rest_s']:>6.2f} {rel:>14}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
