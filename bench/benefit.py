"""Benefit of joining: per site, on its own test split, the model it trains alone (equal
compute) against the global model and each personalised model (finetune, personal_head,
ditto), without DP and under DP-SGD at the sites (epsilon 8), over seeds.

Every number comes from the real ClientApp handlers (``fedcare.client.app.train`` and
``evaluate``, with a Flower Context per site that keeps its personal state between
messages, its own ledger and DP-SGD through Opacus); the only thing done by hand is
FedAvg weighted by examples over the shared arrays (as bench/privacy.py does: the full
``fedcare simulate`` costs Ray/SuperLink start-up per run on a shared 2-core machine).
Each run's last-round evaluation reply carries the site's benefit record: the global,
personal and alone models with 95% bootstrap intervals (client/personalize.py).

Under DP every DP-SGD step a site takes (federated rounds, personal steps, the alone
baseline) is calibrated together to the target epsilon (``RunConfig.site_dp_steps``), so
the alone model and the federation share one budget per site and the same noise per step.

Settings per task are bench/utility.py's CPU presets (heart-disease: FLamby's 4 centres,
5 rounds x 100 local steps, batch 4, Adam 1e-3; medical-abstracts: 4 sites, Dirichlet 0.3,
head mode on cached MiniLM embeddings; breastmnist: 4 sites, head mode on frozen
EfficientNet-Lite0 features), with the personal steps = the task's local steps at its
learning rate, ditto lambda 0.1. ``--set key=value`` overrides a preset key (e.g.
``max_train=200``) to make a run fit.

    python bench/benefit.py --tasks heart-disease                 # 3 seeds, no DP and eps 8
    python bench/benefit.py --tasks medical-abstracts --seeds 42 --set rounds=10
    python bench/benefit.py --tasks breastmnist --out /tmp/b.json       # alongside another run
    python bench/benefit.py --no-run --merge /tmp/b.json                # then one table of both
Writes bench/results/benefit.json (rows merged by task), bench/results/benefit.png, and
prints the table of medians [min-max] over seeds, per site.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from utility import DEFAULT_CACHE, SIZES, for_epsilon, make_config  # noqa: E402

from fedcare import schemas as S  # noqa: E402
from fedcare.records import from_array_record, to_array_record  # noqa: E402
from fedcare.server.federation import initial_state  # noqa: E402
from fedcare.strategies.personal import personal_split  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "benefit.json"
METHODS = ("finetune", "personal_head", "ditto")
TASKS = ("heart-disease", "medical-abstracts", "breastmnist")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
# runs whose "global" column is not read: in the recorded rows a personal_head site
# evaluated the global weights with its own bias left in the model (now the initial one)
GLOBAL_UNSEEN = ("personal_head",)
# the target metric per task
TARGET_METRIC = {"heart-disease": "balanced_accuracy", "breastmnist": "balanced_accuracy",
                 "medical-abstracts": "macro_f1"}


def _identity() -> None:
    """A Flower task identity, so that the ClientApp handlers run outside a SuperNode."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 11, 1


def run_one(task: str, method: str, seed: int, eps: float | None, preset: dict, ledger_dir: Path) -> dict:
    """One federation of ``method`` with the alone baseline; per site its benefit record."""
    from fedcare.client import app as client_app

    p = for_epsilon(preset, eps)
    cfg = make_config(task, p, p.get("mode"), seed, eps, p["rounds"], p["local_steps"])
    cfg.update({"personalize.method": method, "personalize.alone": True, "personalize.bootstrap": 1000})
    cfg.site.ledger_dir = str(ledger_dir)
    cfg.runtime.run_id = f"benefit-{task}-{method}-{seed}-{eps}"
    cfg.validate()
    sites = cfg_sites(cfg)
    contexts = [Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config=cfg.to_flat(),
                        node_config={"partition-id": i, "num-partitions": len(sites)}) for i in range(len(sites))]
    state = initial_state(cfg)
    shared_keys, _ = personal_split(state, cfg)
    shared = {k: v for k, v in state.items() if k in shared_keys}
    t0 = time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        updates, weights = [], []
        for ctx in contexts:
            reply = client_app.train(_message("train", shared, rnd), ctx)
            if reply.content[S.SITE][S.STATUS] != "ok":
                raise RuntimeError(reply.content[S.SITE][S.REASON])
            updates.append(dict(from_array_record(reply.content[S.ARRAYS])))
            weights.append(float(reply.content[S.METRICS][S.NUM_EXAMPLES]))
        w = np.asarray(weights) / sum(weights)
        shared = {k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, updates)).astype(np.float32)
                  for k in shared}
    out = {}
    for site, ctx in zip(sites, contexts):
        reply = client_app.evaluate(_message("evaluate", shared, cfg.rounds), ctx)
        out[site] = json.loads(reply.content[S.SITE][S.BENEFIT_JSON])
    return {"task": task, "method": method, "seed": seed, "epsilon": eps, "rounds": cfg.rounds,
            "local_steps": cfg.train.local_steps, "personal_steps": cfg.personal_steps,
            "site_dp_steps": cfg.site_dp_steps if eps is not None else None,
            "wall_s": time.perf_counter() - t0, "sites": out}


def cfg_sites(cfg) -> list[str]:
    from fedcare.models.registry import get_task

    return get_task(cfg.task).site_ids(cfg)


def _message(kind: str, state: dict, rnd: int) -> Message:
    return Message(RecordDict({S.ARRAYS: to_array_record(state), S.CONFIG: ConfigRecord({"server-round": rnd})}),
                   dst_node_id=1000, message_type=kind)


# ------------------------------------------------------------------------ summary
def summary(rows: list[dict]) -> list[dict]:
    """Per (task, epsilon, site): median/min/max over seeds of each model's metrics, the
    alone model pooled over the methods' runs of a seed (median over them first), the
    global model over the finetune and ditto runs (``GLOBAL_UNSEEN``), each personal
    method separately."""
    out = []
    for task, eps in sorted({(r["task"], r["epsilon"]) for r in rows}, key=lambda k: (k[0], k[1] or 0)):
        rs = [r for r in rows if r["task"] == task and r["epsilon"] == eps]
        sites = sorted({s for r in rs for s in r["sites"]})
        seeds = sorted({r["seed"] for r in rs})
        for site in sites:
            entry = {"task": task, "epsilon": eps, "site": site, "seeds": seeds, "models": {}}
            models = {"alone": ("alone", None), "global": ("global", None),
                      **{m: ("personal", m) for m in METHODS}}
            for name, (key, method) in models.items():
                per_metric = {}
                for metric in METRICS:
                    per_seed = []
                    for seed in seeds:
                        vals = [r["sites"][site][key][metric] for r in rs if r["seed"] == seed
                                and (method is None or r["method"] == method)
                                and not (name == "global" and r["method"] in GLOBAL_UNSEEN)
                                and key in r["sites"].get(site, {}) and metric in r["sites"][site][key]]
                        if vals:
                            per_seed.append(statistics.median(vals))
                    if per_seed:
                        per_metric[metric] = {"median": statistics.median(per_seed), "min": min(per_seed),
                                              "max": max(per_seed), "n": len(per_seed)}
                if per_metric:
                    entry["models"][name] = per_metric
            glob = [r["sites"][site]["global"] for r in rs if site in r["sites"]]
            entry["prevalence"] = {k: statistics.median(g[k] for g in glob if k in g)
                                   for k in sorted({k for g in glob for k in g if k.startswith("prevalence_")})}
            entry["n_test"] = int(glob[0]["n"]) if glob else None
            entry["ci_halfwidth_global"] = {m: statistics.median((g[f"{m}_hi"] - g[f"{m}_lo"]) / 2 for g in glob)
                                            for m in METRICS if all(f"{m}_lo" in g for g in glob)}
            out.append(entry)
    return out


def check_targets(summ: list[dict]) -> list[dict]:
    """The issue's target per site: the best personalised model's median at least both
    the alone and the global model's, within the global model's bootstrap half-width."""
    out = []
    for e in summ:
        metric = TARGET_METRIC[e["task"]]
        best = max((e["models"][m][metric]["median"], m) for m in METHODS
                   if m in e["models"] and metric in e["models"][m]) if any(m in e["models"] for m in METHODS) else None
        if best is None or metric not in e["models"].get("alone", {}):
            continue
        slack = e["ci_halfwidth_global"].get(metric, 0.0)
        alone, glob = e["models"]["alone"][metric]["median"], e["models"]["global"][metric]["median"]
        out.append({"task": e["task"], "epsilon": e["epsilon"], "site": e["site"], "metric": metric,
                    "best_personal": best[1], "value": best[0], "alone": alone, "global": glob,
                    "ci_halfwidth": slack, "met_strict": best[0] >= max(alone, glob),
                    "met_within_ci": best[0] + slack >= max(alone, glob)})
    return out


def table(summ: list[dict]) -> str:
    heads = ["task", "DP", "site", "n test", "prevalence", "metric", "alone", "global", *METHODS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for e in summ:
        metric = TARGET_METRIC[e["task"]]
        prev = " ".join(f"{k.removeprefix('prevalence_')}:{v:.2f}" for k, v in e["prevalence"].items()) or "suppressed"
        for m in dict.fromkeys(("accuracy", metric)):
            cells = [e["task"], "no DP" if e["epsilon"] is None else f"eps {e['epsilon']:g}", e["site"],
                     str(e["n_test"]), prev, m]
            for model in ("alone", "global", *METHODS):
                d = e["models"].get(model, {}).get(m)
                cells.append("-" if not d else f"{d['median']:.3f} [{d['min']:.3f}-{d['max']:.3f}]")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summ: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot"
    panels = sorted({(e["task"], e["epsilon"]) for e in summ}, key=lambda k: (k[0], k[1] or 0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    models = ("alone", "global", *METHODS)
    for ax, (task, eps) in zip(axes[0], panels):
        metric = TARGET_METRIC[task]
        es = [e for e in summ if e["task"] == task and e["epsilon"] == eps]
        x = np.arange(len(es))
        for i, m in enumerate(models):
            med = [e["models"].get(m, {}).get(metric, {}).get("median", np.nan) for e in es]
            lo = [e["models"].get(m, {}).get(metric, {}).get("min", np.nan) for e in es]
            hi = [e["models"].get(m, {}).get(metric, {}).get("max", np.nan) for e in es]
            ax.bar(x + (i - 2) * 0.16, med, 0.16, label=m,
                   yerr=[np.subtract(med, lo), np.subtract(hi, med)], capsize=2)
        ax.set_xticks(x, [e["site"] for e in es], rotation=20)
        ax.set_title(f"{task}, {'no DP' if eps is None else f'eps {eps:g}'}")
        ax.set_ylabel(f"{metric} (median, min-max over seeds)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["heart-disease"], choices=TASKS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--epsilons", nargs="+", default=["none", "8"])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="preset key=value")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="MiniLM embedding cache (text task)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="also take the rows (and sizes) of these JSON files, e.g. a task run with its own --out")
    ap.add_argument("--no-run", action="store_true", help="only summarise the rows already in --out and --merge")
    args = ap.parse_args(argv)
    _identity()
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    running = [] if args.no_run else args.tasks
    rows = [r for r in previous.get("rows", []) if r["task"] not in running]
    sizes = dict(previous.get("sizes", {}))
    for other in args.merge:
        doc = json.loads(other.read_text())
        merged = {r["task"] for r in doc["rows"]}
        rows = [r for r in rows if r["task"] not in merged] + doc["rows"]
        sizes.update(doc.get("sizes", {}))
    for task in running:
        preset = dict(SIZES["cpu"]["settings"][task])
        for item in args.sets:
            k, _, v = item.partition("=")
            preset[k] = type(preset[k])(v) if k in preset and preset[k] is not None else v
        sizes[task] = {"preset": preset, "methods": args.methods, "seeds": args.seeds, "epsilons": args.epsilons}
        if task == "medical-abstracts" and args.cache.is_file():
            import torch

            import fedcare.models.medical_abstracts as ma

            ma._EMBEDDINGS.update(torch.load(args.cache))
        for eps in epsilons:
            for seed in args.seeds:
                for method in args.methods:
                    with tempfile.TemporaryDirectory() as tmp:
                        row = run_one(task, method, seed, eps, preset, Path(tmp))
                    rows.append(row)
                    print(f"{task} {method} seed {seed} {'no DP' if eps is None else f'eps {eps:g}'}: "
                          f"{row['wall_s']:.0f} s", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"machine": machine(), "sizes": sizes, "rows": rows}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summ = summary(rows)
    targets = check_targets(summ)
    args.out.write_text(json.dumps({"machine": machine(), "sizes": sizes, "rows": rows, "summary": summ,
                                    "targets": targets}, indent=1))
    print(table(summ))
    met = sum(t["met_within_ci"] for t in targets)
    print(f"\ntargets (best personalised >= alone and global, within the global model's bootstrap half-width): "
          f"{met}/{len(targets)} site settings")
    for t in targets:
        if not t["met_within_ci"]:
            print(f"  not met: {t['task']} {t['epsilon']} {t['site']}: {t['best_personal']} {t['value']:.3f} "
                  f"vs alone {t['alone']:.3f}, global {t['global']:.3f} (half-width {t['ci_halfwidth']:.3f})")
    note = plot(summ, args.out.with_suffix(".png"))
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
