"""Many virtual hospitals: `fedcare simulate` of heart-disease-virtual at 10, 100 and
1,000 sites with a tenth sampled per round, on a Ray started for the run (one node) and
on a local two-node Ray cluster (fedcare/raycluster.py, one CPU per node).

    python bench/scale.py [--sites 10,100,1000] [--rounds 10] [--nodes 1,2] [--dashboard]

Per run: wall time of the command, per-round time (from the store: push to stored),
peak resident memory summed over every process of the run (the command and all its
descendants: SuperLink, flwr run, ServerApp, the simulation driver, Ray's GCS, raylet
and workers; plus the cluster's processes on two nodes) sampled every 0.5 s, with the
peak of each kind of process, the SQLite store's size, `fedcare report --json` time
(a fresh process, as a user runs it) and build_report's own time, and with
--dashboard every dashboard page's render time (bench/dashboard.py's headless browser,
one load) for the largest run. Every run samples strategy.fraction_train and
fraction_evaluate sites (at least strategy.min_sites=2) and evaluates riding on train.
Writes bench/results/scale.json, prints a table and draws bench/results/scale.png.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402
from fedcare.raycluster import local_cluster  # noqa: E402
from fedcare.server.report import build_report  # noqa: E402
from fedcare.server.store import Store  # noqa: E402

PAGE = 4096


class PeakRss:
    """Samples the summed resident memory of a process tree (and extra pids) until stopped."""

    def __init__(self, root: int, extra=lambda: []) -> None:
        self.root, self.extra = root, extra
        self.peak_total, self.peak_by_kind = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = _tree(self.root) | set(self.extra())
            total, kinds = 0, {}
            for pid in procs:
                rss, kind = _rss_kind(pid)
                total += rss
                kinds[kind] = kinds.get(kind, 0) + rss
            self.peak_total = max(self.peak_total, total)
            for k, v in kinds.items():
                self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0), v)
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_kind(pid: int) -> tuple[int, str]:
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return 0, "gone"
    for kind in ("flower-superlink", "flwr-serverapp", "flwr-simulation", "flwr run", "ClientAppActor", "raylet",
                 "gcs_server", "dashboard", "log_monitor", "monitor.py", "fedcare.cli", "ray::"):
        if kind in cmd:
            return rss, kind.strip()
    return rss, (cmd.split()[0].rsplit("/", 1)[-1] if cmd else "other")


def run_once(sites: int, rounds: int, nodes: int, work: Path, fraction: float) -> dict:
    db_path = work / f"scale-{sites}-{nodes}.db"
    db = f"sqlite:///{db_path}"
    sets = [f"strategy.fraction_train={fraction}", f"strategy.fraction_evaluate={fraction}",
            "strategy.evaluate_with_train=true", "strategy.min_sites=2"]
    cmd = [sys.executable, "-c", "from fedcare.cli import main; main()", "simulate", "--task", "heart-disease-virtual",
           "--sites", str(sites), "--rounds", str(rounds), "--db", db, "--quiet",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "FEDCARE_WORKDIR": str(work)}
    with (local_cluster(nodes, 1) if nodes > 1 else contextlib.nullcontext()) as cluster:
        if cluster is not None:
            cmd += ["--ray-address", cluster.address]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        rss = PeakRss(proc.pid, cluster.pids if cluster is not None else (lambda: []))
        out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"simulate failed ({proc.returncode}):\n{out[-3000:]}")
    run_id = re.search(r"run (run-\S+) completed", out).group(1)
    t = time.perf_counter()
    rep = subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", "report", run_id,
                          "--db", db, "--json"], capture_output=True, text=True, cwd=ROOT)
    report_cli_s = time.perf_counter() - t
    assert rep.returncode == 0, rep.stderr
    with Store(db) as store:
        t = time.perf_counter()
        report = build_report(store, run_id)
        json.dumps(report)
        report_s = time.perf_counter() - t
        placed = [e["data"] for e in store.events(run_id) if e["kind"] == "placement"]
    round_s = [r["duration_s"] for r in report["rounds"]]
    return {"sites": sites, "nodes": nodes, "rounds": rounds, "sampled_per_round": report["rounds"][0]["num_sites"],
            "run_id": run_id, "db": str(db_path), "wall_s": round(wall, 1),
            "round_s": [round(x, 2) for x in round_s], "median_round_s": round(statistics.median(round_s), 2),
            "peak_rss_total_mib": round(rss.peak_total / 2**20), "peak_rss_by_kind_mib":
                {k: round(v / 2**20) for k, v in sorted(rss.peak_by_kind.items(), key=lambda kv: -kv[1]) if v > 0},
            "store_bytes": db_path.stat().st_size, "report_cli_s": round(report_cli_s, 2),
            "build_report_s": round(report_s, 3),
            "ray_nodes_used": len({w.split("/")[1] for p in placed for w in p.values()}),
            "final_accuracy": report["final"]["metrics"].get("accuracy")}


def time_dashboard(db: str, run_id: str, pages: list[str] | None = None) -> dict:
    """Each dashboard page's render time (one load, a dashboard of its own per page) for
    the run in ``db`` (bench/dashboard.py); a page that does not finish drawing within
    its 300 s says so instead of ending the bench."""
    spec = importlib.util.spec_from_file_location("bench_dashboard", Path(__file__).with_name("dashboard.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.NO_CHARTS = mod.NO_CHARTS | {"privacy"}   # without DP the privacy page draws no chart
    out = {}
    for name, path in {n: mod.PAGES[n] for n in pages or mod.PAGES}.items():
        try:
            loads = mod.time_pages(f"sqlite:///{db}", run_id, 1, None, {name: path})[name]
            out[name] = round(loads[0]["render_s"], 2)
        except Exception as err:  # noqa: BLE001 - a page that never renders is a result
            out[name] = f"not rendered: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        print(f"dashboard {name}: {out[name]}", flush=True)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for nodes in sorted({r["nodes"] for r in rows}):
        mine = sorted((r for r in rows if r["nodes"] == nodes), key=lambda r: r["sites"])
        label = f"{nodes} Ray node{'s' if nodes > 1 else ''}"
        axes[0].plot([r["sampled_per_round"] for r in mine], [r["median_round_s"] for r in mine], "o-", label=label)
        axes[1].plot([r["sites"] for r in mine], [r["peak_rss_total_mib"] for r in mine], "o-", label=label)
    axes[0].set(xlabel="sites sampled per round", ylabel="median round time (s)", title="round time")
    axes[1].set(xlabel="virtual hospitals", ylabel="peak resident memory, all processes (MiB)", xscale="log",
                title="memory")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("fedcare simulate, heart-disease-virtual, 10% sampled per round (2-core shared machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="10,100,1000")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--nodes", default="1,2", help="1: a Ray started for the run; 2: a local two-node cluster")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--dashboard", action="store_true", help="time the dashboard pages of the largest one-node run")
    p.add_argument("--label", default="")
    p.add_argument("--dashboard-only", nargs=2, metavar=("DB", "RUN_ID"),
                   help="only time the dashboard pages of this run (prints them)")
    p.add_argument("--pages", default="", help="with --dashboard-only: comma-separated pages (default: all)")
    args = p.parse_args()
    if args.dashboard_only:
        print(json.dumps(time_dashboard(*args.dashboard_only, [x for x in args.pages.split(",") if x]), indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="fedcare-scale-"))
    load_before = os.getloadavg()
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        for sites in (int(s) for s in args.sites.split(",")):
            row = run_once(sites, args.rounds, nodes, work, args.fraction)
            print(f"{sites} sites, {nodes} node(s): {row['wall_s']} s, median round {row['median_round_s']} s, "
                  f"peak RSS {row['peak_rss_total_mib']} MiB", flush=True)
            rows.append(row)
    result = {"label": args.label, "cpu_count": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "rows": rows, "dashboard": {}}
    write_json("scale", result)   # before the dashboard: its browser must not cost the runs' numbers
    largest = max((r for r in rows if r["nodes"] == 1), key=lambda r: r["sites"], default=None)
    if args.dashboard and largest is not None:
        result["dashboard"] = {"sites": largest["sites"], "pages_s": time_dashboard(largest["db"], largest["run_id"])}
        write_json("scale", result)
    dashboard = result["dashboard"]
    print_table(["sites", "sampled/round", "Ray nodes", "wall (s)", "median round (s)", "peak RSS (MiB)",
                 "store (MiB)", "report CLI (s)", "build_report (s)", "nodes used"],
                [[r["sites"], r["sampled_per_round"], r["nodes"], r["wall_s"], r["median_round_s"],
                  r["peak_rss_total_mib"], round(r["store_bytes"] / 2**20, 2), r["report_cli_s"],
                  r["build_report_s"], r["ray_nodes_used"]] for r in rows])
    if dashboard:
        print("dashboard pages (s, one load):", dashboard["pages_s"])
    plot(rows, ROOT / "bench" / "results" / "scale.png")


if __name__ == "__main__":
    main()
