"""Benchmark: LoRA aggregation modes (naive | ffa | exact) and q-FedAvg vs FedAvg on
medical-abstracts, against pooled training (the limit) and each site alone.

Federated runs go through the real ServerApp loop and ClientApp handlers and land in a
SQL store; results are read back as the run report (``fedcare report RUN --json``).
Two engines: ``--engine inprocess`` (default; bench/common.py's in-process grid: same
Flower messages, no SuperLink/Ray start-up, which times out on an overloaded machine)
and ``--engine simulate`` (``fedcare simulate ... --db URL`` subprocesses, then
``fedcare report RUN --db URL --json``). Baselines
train in-process with ``fedcare.models.training`` on the same data subset and the same
number of optimiser steps (pooled: rounds x local_steps x sites; alone: rounds x
local_steps per site). Baselines are without DP.

    python bench/lora_strategies.py --quick          # 4 sites, alpha 1.0, no DP, 2 rounds, tiny subset
    python bench/lora_strategies.py                  # the full grid (hours on a CPU; meant for a GPU)

Writes bench/results/lora_strategies.json, prints a table, and plots accuracy per
round to bench/results/lora_strategies.png (needs matplotlib: pip install -e .[bench]).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TASK = "medical-abstracts"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Scenario:
    sites: int
    alpha: float
    epsilon: float          # 0 = no DP
    strategy: str
    aggregation: str

    @property
    def group(self) -> str:
        dp = f"eps {self.epsilon:g}" if self.epsilon else "no DP"
        return f"{self.sites} sites, alpha {self.alpha:g}, {dp}"

    @property
    def label(self) -> str:
        return f"{self.strategy}/{self.aggregation}"


def scenarios(quick: bool, sites: list[int] | None = None) -> list[Scenario]:
    sites, alphas, eps = ([4], [1.0], [0.0]) if quick else (sites or [4, 8], [0.3, 1.0], [0.0, 3.0])
    out = []
    for n, a, e in itertools.product(sites, alphas, eps):
        out += [Scenario(n, a, e, "fedavg", agg) for agg in ("naive", "ffa", "exact")]
        out.append(Scenario(n, a, e, "qfedavg", "naive"))
    return out


def common_sets(args) -> list[str]:
    sets = [f"train.local_steps={args.local_steps}", f"data.max_train_per_site={args.max_train}",
            f"data.max_test_per_site={args.max_test}", f"lora.r={args.rank}",
            f"train.batch_size={args.batch_size}"]
    return sets + ([f"train.lr={args.lr}"] if args.lr else [])


def scenario_sets(sc: Scenario, args) -> list[str]:
    sets = common_sets(args) + [f"data.dirichlet_alpha={sc.alpha}", f"lora.aggregation={sc.aggregation}"]
    if sc.epsilon:
        sets.append(f"dp.epsilon={sc.epsilon}")
    return sets


# ------------------------------------------------------------------ federated runs
def fedcare_cmd() -> list[str]:
    exe = shutil.which("fedcare")
    return [exe] if exe else [sys.executable, "-c", "from fedcare.cli import main; main()"]


def run_federated(sc: Scenario, args, db: str) -> dict:
    if args.engine == "inprocess":
        return run_inprocess(sc, args, db)
    return run_simulate(sc, args, db)


def run_inprocess(sc: Scenario, args, db: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_federated as federate

    import torch

    torch.set_num_threads(args.threads)   # sites train one after another here: give each every core

    from fedcare.launch import default_ledger_dir, resolve_config

    t0 = time.time()
    try:
        cfg = resolve_config(TASK, scenario_sets(sc, args), sites=sc.sites, rounds=args.rounds,
                             seed=args.seed, **{"strategy.name": sc.strategy})
        cfg.site.ledger_dir = default_ledger_dir("bench")
        report = federate(cfg, db)
    except Exception as err:  # one failed scenario must not lose the others
        return {"scenario": asdict(sc), "error": f"{type(err).__name__}: {err}", "wall_s": time.time() - t0}
    return {"scenario": asdict(sc), "run_id": report["run_id"], "wall_s": time.time() - t0, "report": report}


def run_simulate(sc: Scenario, args, db: str) -> dict:
    cmd = fedcare_cmd() + ["simulate", "--task", TASK, "--sites", str(sc.sites), "--rounds", str(args.rounds),
                           "--strategy", sc.strategy, "--seed", str(args.seed), "--db", db, "--quiet"]
    for s in scenario_sets(sc, args):
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        return {"scenario": asdict(sc), "error": f"timed out after {args.timeout:g} s", "wall_s": time.time() - t0}
    wall = time.time() - t0
    m = re.search(r"^run (\S+):", stdout, re.M)
    if proc.returncode != 0 or not m:
        return {"scenario": asdict(sc), "error": (stderr or stdout).strip()[-2000:], "wall_s": wall}
    run_id = m.group(1)
    rep = subprocess.run(fedcare_cmd() + ["report", run_id, "--db", db, "--json"],
                         capture_output=True, text=True, timeout=600, check=True)
    return {"scenario": asdict(sc), "run_id": run_id, "wall_s": wall, "report": json.loads(rep.stdout)}


def stop_tree(proc: subprocess.Popen) -> None:
    """Ctrl-C to ``fedcare simulate`` (it stops its SuperLink and Flower run), then
    kill its whole process group if it is still there."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def summarise(result: dict, pooled_accuracy: float | None) -> dict:
    """The bench's row for one federated run, from its report."""
    sc = result["scenario"]
    row = {"group": Scenario(**sc).group, "label": Scenario(**sc).label, **sc,
           "run_id": result.get("run_id"), "wall_s": round(result["wall_s"], 1)}
    if "error" in result:
        return {**row, "error": result["error"].splitlines()[-1] if result["error"] else "failed"}
    rep = result["report"]
    final = rep.get("final", {})
    per_site = final.get("per_site", {})
    site_acc = [m["accuracy"] for m in per_site.values() if m.get("accuracy") is not None]
    curve = [(r["round"], r["metrics"].get("eval", {}).get("accuracy")) for r in rep["rounds"]]
    bytes_per_round = [sum(s.get("update_bytes") or 0 for s in r["sites"]) for r in rep["rounds"]]
    svd = [r["metrics"]["svd_rel_error"] for r in rep["rounds"] if "svd_rel_error" in r["metrics"]]
    to_90 = None
    if pooled_accuracy:
        to_90 = next((rnd for rnd, acc in curve if acc is not None and acc >= 0.9 * pooled_accuracy), None)
    return {**row,
            "accuracy": final.get("metrics", {}).get("accuracy"),
            "macro_f1": final.get("metrics", {}).get("macro_f1"),
            "worst_site_accuracy": min(site_acc) if site_acc else None,
            "rounds_to_90pct_pooled": to_90,
            "bytes_per_round": float(np.mean(bytes_per_round)) if bytes_per_round else None,
            "svd_rel_error_mean": float(np.mean(svd)) if svd else None,
            "accuracy_per_round": curve}


# ------------------------------------------------------------------------ baselines
def baselines(sites: int, alpha: float, args) -> dict:
    """Pooled training on all sites' data, and each site alone (no DP)."""
    import torch

    from fedcare.launch import resolve_config
    from fedcare.models.registry import get_task
    from fedcare.models.training import make_optimizer, make_train_loader, predict_dataset, train_steps

    cfg = resolve_config(TASK, common_sets(args) + [f"data.dirichlet_alpha={alpha}"],
                         sites=sites, rounds=args.rounds, seed=args.seed)
    task = get_task(TASK)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = [task.load_site(s, cfg) for s in task.site_ids(cfg)]

    def fit(train, steps, seed):
        torch.manual_seed(seed)
        model = task.build_model(cfg).to(device)
        opt = make_optimizer(model, cfg)
        train_steps(task, model, opt, make_train_loader(train, cfg, seed), steps, device)
        return model

    def evaluate(model, test):
        scores, labels = predict_dataset(task, model, test, cfg, device)
        return task.metrics(scores, labels)

    from torch.utils.data import ConcatDataset

    t0 = time.time()
    pooled_model = fit(ConcatDataset([s.train for s in splits]), args.rounds * cfg.train.local_steps * sites, args.seed)
    pooled = evaluate(pooled_model, ConcatDataset([s.test for s in splits]))
    pooled_sites = {s.site_id: evaluate(pooled_model, s.test)["accuracy"] for s in splits}
    alone = {}
    for k, s in enumerate(splits):
        m = fit(s.train, args.rounds * cfg.train.local_steps, args.seed + k)
        alone[s.site_id] = evaluate(m, s.test)
    acc = [m["accuracy"] for m in alone.values()]
    n_test = [len(s.test) for s in splits]
    return {
        "pooled": {"accuracy": pooled["accuracy"], "macro_f1": pooled["macro_f1"],
                   "worst_site_accuracy": min(pooled_sites.values())},
        "alone": {"accuracy": float(np.average(acc, weights=n_test)),
                  "macro_f1": float(np.average([m["macro_f1"] for m in alone.values()], weights=n_test)),
                  "worst_site_accuracy": float(min(acc)), "per_site": alone},
        "wall_s": round(time.time() - t0, 1),
    }


# ---------------------------------------------------------------------------- output
COLUMNS = ("group", "label", "accuracy", "macro_f1", "worst_site_accuracy", "rounds_to_90pct_pooled",
           "bytes_per_round", "svd_rel_error_mean", "wall_s")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4f}" if v < 10 else f"{v:,.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    cells = [COLUMNS] + [tuple(fmt(r.get(c)) if "error" not in r or c in ("group", "label") else
                               ("error: " + r["error"][:60] if c == "accuracy" else "") for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(rows: list[dict], base: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]); no plot"
    groups = sorted({r["group"] for r in rows})
    cols = min(4, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, groups):
        for r in (r for r in rows if r["group"] == g and r.get("accuracy_per_round")):
            xs = [x for x, y in r["accuracy_per_round"] if y is not None]
            ys = [y for x, y in r["accuracy_per_round"] if y is not None]
            ax.plot(xs, ys, marker="o", label=r["label"])
        key = g.split(", eps")[0].split(", no DP")[0]
        if key in base:
            ax.axhline(base[key]["pooled"]["accuracy"], ls="--", c="k", label="pooled")
            ax.axhline(base[key]["alone"]["accuracy"], ls=":", c="gray", label="site alone")
        ax.set_title(g)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (global model, all sites' test data)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="4 sites, alpha 1.0, no DP, 2 rounds of 2 steps, 16 train / 16 test examples per site")
    p.add_argument("--rounds", type=int)
    p.add_argument("--sites", type=int, nargs="+", help="site counts of the grid (default: 4 8)")
    p.add_argument("--local-steps", type=int)
    p.add_argument("--max-train", type=int, help="train examples per site (0 = all)")
    p.add_argument("--max-test", type=int, help="test examples per site (0 = all)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=float, help="local learning rate (default: the task's, 5e-4)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (inprocess engine)")
    p.add_argument("--db", help="store URL (default: a fresh SQLite file in a temporary folder)")
    p.add_argument("--out", type=Path, default=RESULTS / "lora_strategies.json")
    p.add_argument("--engine", choices=("inprocess", "simulate"), default="inprocess")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per federated run (simulate engine)")
    args = p.parse_args(argv)
    quick_defaults = dict(rounds=2, local_steps=2, max_train=16, max_test=16, batch_size=4)
    full_defaults = dict(rounds=10, local_steps=20, max_train=400, max_test=200, batch_size=16)
    for k, v in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    tmp = tempfile.mkdtemp(prefix="fedcare-bench-")
    db = args.db or f"sqlite:///{tmp}/lora_strategies.db"

    grid = scenarios(args.quick, args.sites)
    base: dict[str, dict] = {}
    for sites, alpha in sorted({(s.sites, s.alpha) for s in grid}):
        print(f"baselines: {sites} sites, alpha {alpha:g} ...", flush=True)
        base[f"{sites} sites, alpha {alpha:g}"] = baselines(sites, alpha, args)
    rows: list[dict] = []

    def write(rows: list[dict], done: bool) -> None:
        """The JSON so far (after every run, so a stopped bench keeps what it measured)."""
        out = {"task": TASK, "quick": args.quick, "db": db, "engine": args.engine, "complete": done,
               "settings": {k: getattr(args, k) for k in ("rounds", "local_steps", "max_train", "max_test", "rank",
                                                     "batch_size", "seed", "lr", "threads")},
               "load_average": list(os.getloadavg()), "cpus": os.cpu_count(), "rows": rows, "baselines": base}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=float))

    for sc in grid:
        print(f"run: {sc.group}: {sc.label} ...", flush=True)
        result = run_federated(sc, args, db)
        pooled = base[f"{sc.sites} sites, alpha {sc.alpha:g}"]["pooled"]["accuracy"]
        rows.append(summarise(result, pooled))
        if "error" in rows[-1]:
            print(f"  failed: {rows[-1]['error']}", flush=True)
        else:
            print(f"  accuracy {rows[-1]['accuracy']:.4f}, {rows[-1]['wall_s']:.0f} s", flush=True)
        write(rows, done=False)
    rows += [{"group": key, "label": f"baseline: {name}", **{k: v for k, v in b[name].items() if k != "per_site"},
              "wall_s": b["wall_s"]} for key, b in base.items() for name in ("pooled", "alone")]
    write(rows, done=True)
    print(table(rows))
    problem = plot([r for r in rows if "accuracy_per_round" in r], base, args.out.with_suffix(".png"))
    print(problem or f"plot: {args.out.with_suffix('.png')}")
    print(f"json: {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
