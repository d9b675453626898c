"""medical-llm quality: exact match of the generated condition on held-out abstracts, for
the base model zero-shot, federated LoRA and pooled LoRA at equal compute, over seeds.

Issue 13's target: federated LoRA exact match (median over seeds 42, 43, 44) at least 10
points above the base model's zero-shot exact match.

Settings (every seed):
- base: SmolLM2-135M-Instruct as bundled, no training (the LoRA B factors start at zero,
  so the built model answers as the base model does).
- federated: the real ServerApp loop and ClientApp handlers in process
  (``bench/common.run_federated``: same Flower messages, no SuperLink/Ray), FedAvg over
  4 sites, Dirichlet alpha 0.3, R rounds x S local steps at every site. Every round's
  global state is kept in the run's SQL store; the bench scores each one on the held-out
  abstracts (the curve: exact match vs the federation's optimiser steps, N x S per round).
- pooled: the union of the 4 sites' training data as one data set, N x R x S steps with
  the same batch size, optimiser and learning rate (equal compute; ``utility._train_alone``,
  i.e. ``train_on_site`` for one round).
- references, no model: ``majority`` always answers the condition most frequent in the
  sites' training data; ``best constant`` is the best any single answer given to every
  held-out abstract can score (the held-out split's most frequent condition). A model
  that has learnt the answer format but not to read the abstracts lands at or below
  ``best constant``; ``top answer share`` (the share of abstracts given the model's most
  frequent answer; 1.0 = one answer for everything) tells the two apart.
Scoring: greedy generation (``MedicalLlmTask._generate``, up to 8 new tokens) equals the
gold condition after ``normalise_answer`` (what the task's ``exact_match`` metric does);
``valid`` is the share of answers that are one of the 5 condition names at all.
``--scoring full`` scores through ``task.predict`` / ``task.metrics`` instead (adds the
5-way likelihood accuracy and the answer perplexity; about 5x the CPU time).
Held-out abstracts: a seeded sample of the partition's test split (the stratified 20 %
of the corpus that no site trains on), the same abstracts for every setting of a seed.
The sites' own evaluation inside the federation loop is cut to 1 abstract per site
(``data.max_test_per_site=1``); it does not change what trains.

Sizes (``--size``; ``--set key=value`` overrides one):
  CPU (default), for a shared 2-core machine, one torch thread (a training step of batch
  4 costs 3-7 s there, a generated answer 0.3-1 s): 4 sites, Dirichlet alpha 0.3, at most
  64 training abstracts per site (the preset's cap), 4 rounds x 3 local steps, batch 4,
  AdamW lr 3e-3, LoRA rank 8 (alpha 16) on q_proj,v_proj (the preset's modules); pooled
  48 steps; 120 held-out abstracts per seed (one abstract is 0.8 points of exact match;
  the binomial standard error at 50 % is 4.6 points). The learning rate comes from a
  short pooled sweep on seed 42 (48 held-out abstracts, batch 4): lr 1e-3 and 3e-3 both
  learn the answer format within 12 steps but first answer one condition for every
  abstract (exact match = that condition's share); they answer different conditions
  for different abstracts from 36-48 steps on (exact match 0.44 at lr 1e-3 after 36
  steps, 0.46 at lr 3e-3 after 48).
  Measured here: about 30 min of CPU time for the 3 seeds (one thread, ~10 min a seed);
  82 min of wall time on the shared machine (load average 6-9 from other work, nice 10).
  The longer curve (16 rounds, seed 42, federated only) took 64 min of wall time.
  GPU (``--size gpu --device cuda``; not run: no GPU here): all training abstracts
  (2,310), 10 rounds x 20 local steps, batch 16, the same lr and rank, the whole test
  split (578 abstracts) held out, ``--scoring full``.

    python bench/llm_quality.py                                     # CPU sizes, seeds 42 43 44
    python bench/llm_quality.py --size gpu --device cuda
    python bench/llm_quality.py --seeds 42 --set rounds=1 --set local_steps=1 --set held_out=8   # smoke
    python bench/llm_quality.py --extend --settings federated --seeds 42 --set rounds=16   # longer curve
    python bench/llm_quality.py --report          # re-summarise, print and plot the JSON, no training

``--extend`` keeps the JSON's results and adds this run's rows as its ``extended`` curve
(a longer federation at the CPU sizes: the same held-out abstracts; its first rounds
repeat the main run's, up to CPU floating-point nondeterminism); ``--wait S`` lets it
wait for a main run still writing the JSON.

Writes bench/results/llm_quality.json (after every seed; ``complete`` once done) and
bench/results/llm_quality.png (needs matplotlib), and prints the table and the target.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import privacy  # noqa: E402  (privacy.CPU: the device utility._train_alone trains on)
from common import RESULTS, print_table, run_federated, write_json  # noqa: E402
from utility import _train_alone, apply_sets, make_config  # noqa: E402

from fedcare.models.base import SiteSplit  # noqa: E402
from fedcare.models.registry import get_task  # noqa: E402
from fedcare.models.state import set_trainable_state  # noqa: E402
from fedcare.models.training import predict_dataset  # noqa: E402

TASK = "medical-llm"
NAME = "llm_quality"
SETTINGS = ("base", "federated", "pooled")
EQUAL_COMPUTE = ("federated: R rounds x S steps at each of N sites; pooled: N x R x S steps on the union of the "
                 "sites' training data; same batch size, optimiser and lr")
EVALUATION = ("greedy generation == gold condition (normalise_answer) on held-out abstracts sampled from the "
              "partition's test split; the same abstracts for every setting of a seed")
TARGET_POINTS = 0.10    # federated exact match >= base zero-shot + 10 points (medians over seeds)

_CPU = dict(sites=4, alpha=0.3, max_train=64, rounds=4, local_steps=3, batch_size=4, lr=3e-3,
            optimizer="adamw", rank=8, held_out=120, clip=1.0, delta=1e-5)
SIZES = {"cpu": _CPU,
         "gpu": {**_CPU, "max_train": 0, "rounds": 10, "local_steps": 20, "batch_size": 16, "held_out": 0}}


# ------------------------------------------------------------------------- configs and data
def config(p: dict, seed: int, rounds: int, local_steps: int, max_test: int, ledger_dir: str):
    """The run's config: the preset's defaults, then the size (``utility.make_config``:
    LoRA rank r with alpha 2r, no DP)."""
    cfg = make_config(TASK, {**p, "max_test": max_test}, "lora", seed, None, rounds, local_steps)
    cfg.site.ledger_dir = ledger_dir
    return cfg


def held_out(task, cfg, n: int, seed: int) -> Subset:
    """``n`` abstracts (0 = all) drawn with ``seed`` from the union of the sites' test
    splits, i.e. the partition's test split, which no site trains on."""
    test = ConcatDataset([task.load_site(s, cfg).test for s in task.site_ids(cfg)])
    rows = np.arange(len(test)) if not n or n >= len(test) else \
        np.sort(np.random.default_rng(seed).choice(len(test), n, replace=False))
    return Subset(test, rows.tolist())


def labels_of(ds) -> np.ndarray:
    return np.array([int(ds[i][-1]) for i in range(len(ds))])


# ------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score(task, model, data, cfg, device, scoring: str) -> dict:
    """Exact match of greedy generation on ``data`` (and, ``full``, the task's metrics)."""
    from fedcare.models.medical_llm import _answer_space, normalise_answer, tokenizer

    t0 = time.perf_counter()
    if scoring == "full":
        scores, labels = predict_dataset(task, model, data, cfg, device)
        m = task.metrics(scores, labels)
        out = {k: float(m[k]) for k in ("exact_match", "accuracy", "macro_f1", "answer_perplexity") if k in m}
        return {**out, "n": int(len(labels)), "eval_s": time.perf_counter() - t0}
    source, names = _answer_space(model)
    tok, valid = tokenizer(source), {normalise_answer(c): i for i, c in enumerate(names)}
    model.eval()
    match, answered = [], []
    for prompt, pmask, _, _, y in DataLoader(data, batch_size=cfg.train.eval_batch_size):
        generated = [normalise_answer(g) for g in task._generate(model, tok, prompt.to(device), pmask.to(device))]
        match += [g == normalise_answer(names[k]) for g, k in zip(generated, y.tolist())]
        answered += [valid.get(g, -1) for g in generated]
    model.train()
    answered = np.asarray(answered)
    return {"exact_match": float(np.mean(match)), "valid": float(np.mean(answered >= 0)),
            "answers": {names[c]: int((answered == c).sum()) for c in range(len(names))},
            "n": len(match), "eval_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------- a seed
def run_seed(seed: int, p: dict, args, device: torch.device) -> list[dict]:
    task = get_task(TASK)
    R, S = p["rounds"], p["local_steps"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        fed_cfg = config(p, seed, R, S, 1, tmp)
        n = fed_cfg.sites
        test = held_out(task, config(p, seed, R, S, 0, tmp), p["held_out"], seed)
        y = labels_of(test)
        splits = {s: task.load_site(s, fed_cfg) for s in task.site_ids(fed_cfg)}
        train = ConcatDataset([sp.train for sp in splits.values()])
        y_train = np.concatenate([sp.train.tensors[-1].numpy() for sp in splits.values()])
        majority = int(np.bincount(y_train, minlength=task.num_classes).argmax())
        common = {"seed": seed, "held_out": int(len(test)), "held_out_labels": np.bincount(y, minlength=5).tolist(),
                  "train_examples": int(len(train))}
        rows.append({**common, "setting": "majority", "steps": 0, "exact_match": float(np.mean(y == majority)),
                     "majority_class": majority})

        def add(setting: str, model, steps: int, wall: float, **extra) -> dict:
            r = {**common, "setting": setting, "steps": steps, "train_s": wall,
                 **score(task, model, test, fed_cfg, device, args.scoring), **extra}
            rows.append(r)
            print(f"  seed {seed} {setting:9} {steps:4d} steps: exact match {r['exact_match']:.4f}"
                  + (f" valid {r['valid']:.2f}" if "valid" in r else "") + f" ({wall:.0f} s train, "
                  f"{r['eval_s']:.0f} s eval)", flush=True)
            return r

        model = task.build_model(fed_cfg).to(device)
        if "base" in args.settings:
            add("base", model, 0, 0.0)
        if "federated" in args.settings:
            federated(fed_cfg, model, tmp, add, args.curve)
        if "pooled" in args.settings:
            t0 = time.perf_counter()
            pool_cfg = config(p, seed, 1, n * R * S, 1, tmp)
            pooled, _ = _train_alone(task, pool_cfg, SiteSplit("pooled", train, ConcatDataset(
                [sp.test for sp in splits.values()])), Path(tmp), f"llm-pooled-{seed}")
            add("pooled", pooled, n * R * S, time.perf_counter() - t0)
    return rows


def federated(cfg, model, tmp: str, add, curve: bool) -> None:
    """The federation (real ServerApp loop, in process); every round's stored global
    state (``curve``; else the last one) loaded into ``model`` and scored."""
    from fedcare.server.store import Store

    R, steps_per_round = cfg.rounds, cfg.sites * cfg.train.local_steps
    t0 = time.perf_counter()
    db = f"sqlite:///{tmp}/fed.db"
    report = run_federated(cfg, db)
    wall = time.perf_counter() - t0
    store = Store(db)
    try:
        states = {r: store.load_global_state(report["run_id"], r) for r in range(1, R + 1)}
    finally:
        store.close()
    for r in (range(1, R + 1) if curve else [R]):
        set_trainable_state(model, states[r])
        add("federated" if r == R else "federated@round", model, steps_per_round * r, wall, round=r)


# ------------------------------------------------------------------------------ summary
def spread(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def best_constant(rows: list[dict]) -> list[dict]:
    """Per seed, the exact match of the best single answer given to every held-out abstract
    (its most frequent condition): what a model that answers one condition whatever the
    abstract can reach at most."""
    out = {}
    for r in rows:
        labels = r["held_out_labels"]
        out[r["seed"]] = {"seed": r["seed"], "setting": "best constant", "steps": 0,
                          "exact_match": max(labels) / sum(labels)}
    return list(out.values())


def top_share(r: dict) -> float | None:
    """The share of held-out abstracts given the model's most frequent answer (1.0: the
    model answers one condition whatever the abstract)."""
    a = r.get("answers")
    return max(a.values()) / r["n"] if a else None


def summarise(rows: list[dict]) -> dict:
    out = {}
    rows = best_constant(rows) + rows
    for setting in ("majority", "best constant", *SETTINGS):
        rs = [r for r in rows if r["setting"] == setting]
        if rs:
            out[setting] = {"exact_match": spread([r["exact_match"] for r in rs]),
                            "steps": rs[0]["steps"], "seeds": [r["seed"] for r in rs]}
            if all("valid" in r for r in rs):
                out[setting]["valid"] = spread([r["valid"] for r in rs])
                out[setting]["top_answer_share"] = spread([top_share(r) for r in rs])
    return out


def target(summ: dict, rows: list[dict]) -> dict:
    if "federated" not in summ or "base" not in summ:
        return {"target": "federated >= base + 10 points", "met": None}
    fed, base = summ["federated"]["exact_match"]["median"], summ["base"]["exact_match"]["median"]
    by_seed = {r["seed"]: r["exact_match"] for r in rows if r["setting"] == "base"}
    paired = [r["exact_match"] - by_seed[r["seed"]] for r in rows if r["setting"] == "federated"]
    const = summ["best constant"]["exact_match"]["median"]
    return {"target": f"federated exact match >= base zero-shot + {100 * TARGET_POINTS:g} points (medians over seeds)",
            "federated": fed, "base": base, "difference": fed - base, "paired_differences": paired,
            "met": fed - base >= TARGET_POINTS,
            "above_best_constant": {"best_constant": const, "difference": fed - const,
                                    "note": "not the issue's target: whether federated beats answering one "
                                            "condition for every abstract (medians over seeds)"}}


def curve_points(rows: list[dict]) -> list[dict]:
    """Median exact match over seeds at each step count of the federation (and the rest)."""
    out = []
    for setting in ("base", "federated", "pooled"):
        rs = [r for r in rows if r["setting"] == setting or (setting == "federated" and r["setting"] == "federated@round")]
        for steps in sorted({r["steps"] for r in rs}):
            vals = [r["exact_match"] for r in rs if r["steps"] == steps]
            out.append({"setting": setting, "steps": steps, **spread(vals)})
    return out


def table(summ: dict) -> str:
    heads = ["setting", "optimiser steps", "seeds", "exact match median [min-max]", "valid answers",
             "top answer share"]
    cells = []
    for setting, s in summ.items():
        e = s["exact_match"]
        cells.append([setting, str(s["steps"]), str(len(s["seeds"])),
                      f"{e['median']:.4f} [{e['min']:.4f}-{e['max']:.4f}]",
                      f"{s['valid']['median']:.2f}" if "valid" in s else "-",
                      f"{s['top_answer_share']['median']:.2f} [{s['top_answer_share']['min']:.2f}-"
                      f"{s['top_answer_share']['max']:.2f}]" if "top_answer_share" in s else "-"])
    return print_table(heads, cells)


def plot(doc: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]); no plot"
    summ, rows = doc["summary"], doc["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = {"majority": "0.75", "best constant": "0.55", "base": "C7", "federated": "C0", "pooled": "C1"}
    settings = [s for s in colours if s in summ]
    med = [summ[s]["exact_match"]["median"] for s in settings]
    lo = [m - summ[s]["exact_match"]["min"] for m, s in zip(med, settings)]
    hi = [summ[s]["exact_match"]["max"] - m for m, s in zip(med, settings)]
    ax1.bar(settings, med, yerr=[lo, hi], capsize=4, color=[colours[s] for s in settings])
    if "base" in summ:
        ax1.axhline(summ["base"]["exact_match"]["median"] + TARGET_POINTS, ls=":", c="k", lw=1,
                    label="target: base zero-shot + 10 points")
        ax1.legend(fontsize=8)
    ax1.set_ylabel("exact match, held-out (median, min-max)")
    ax1.set_ylim(0, 1)
    ax1.tick_params(axis="x", labelsize=8)
    ax1.set_title(f"medical-llm, {doc['size']} sizes, seeds {', '.join(map(str, doc['seeds']))}", fontsize=10)
    first = True
    for seed in sorted({r["seed"] for r in rows}):
        pts = sorted((r["steps"], r["exact_match"]) for r in rows if r["seed"] == seed
                     and r["setting"] in ("base", "federated", "federated@round"))
        ax2.plot(*zip(*pts), "o-", c="C0", alpha=0.5, label="federated, after each round" if first else None)
        pool = [(r["steps"], r["exact_match"]) for r in rows if r["seed"] == seed and r["setting"] == "pooled"]
        if pool:
            ax2.plot(*zip(*pool), "s", c="C1", alpha=0.8, label="pooled (equal compute)" if first else None)
        first = False
    ext = (doc.get("extended") or {}).get("rows") or []
    for seed in sorted({r["seed"] for r in ext}):
        pts = sorted((r["steps"], r["exact_match"]) for r in ext if r["seed"] == seed and r["setting"] != "majority")
        ax2.plot(*zip(*pts), "^--", c="C2", alpha=0.8, label=f"federated, longer run (seed {seed})")
        const = best_constant([r for r in ext if r["seed"] == seed])[0]["exact_match"]
        ax2.axhline(const, ls=":", c="C2", lw=1, label=f"best constant answer (seed {seed})")
    if "best constant" in summ:
        ax2.axhline(summ["best constant"]["exact_match"]["median"], ls="--", c="0.5", lw=1,
                    label="best constant answer (median)")
    ax2.set_xlabel("optimiser steps, all sites together (federated: 4 sites x local steps x rounds)")
    ax2.set_ylabel("exact match")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    ax2.set_title("exact match vs training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def show(doc: dict) -> None:
    """The table, the target and the curves of a results document; the plot."""
    table(doc["summary"])
    t = doc["target"]
    if t["met"] is not None:
        print(f"target {t['target']}: {t['federated']:.4f} - {t['base']:.4f} = {100 * t['difference']:+.1f} points "
              f"(per seed {', '.join(f'{100 * d:+.1f}' for d in t['paired_differences'])}) -> "
              f"{'met' if t['met'] else 'NOT met'}")
        c = t["above_best_constant"]
        print(f"(not a target) federated - best constant answer: {100 * c['difference']:+.1f} points")
    print("curve (median exact match over seeds by optimiser steps):")
    for c in doc["curve"]:
        print(f"  {c['setting']:9} {c['steps']:5d} steps: {c['median']:.4f} [{c['min']:.4f}-{c['max']:.4f}]")
    ext = doc.get("extended")
    if ext:
        print(f"longer run ({ext['command']}):")
        for r in ext["rows"]:
            if r["setting"] != "majority":
                print(f"  seed {r['seed']} {r['setting']:15} {r['steps']:5d} steps: exact match "
                      f"{r['exact_match']:.4f}, top answer share {top_share(r) or 0:.2f}")
    path = RESULTS / f"{NAME}.png"
    print(plot(doc, path) or f"plot: {path}")


def finish(doc: dict, rows: list[dict]) -> dict:
    summ = summarise(rows)
    return {**doc, "summary": summ, "target": target(summ, rows), "curve": curve_points(rows), "rows": rows}


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a size key ({', '.join(_CPU)})")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--scoring", choices=["generate", "full"], help="default: generate (cpu), full (gpu)")
    ap.add_argument("--no-curve", dest="curve", action="store_false",
                    help="score only the federation's last round (not every round's global model)")
    ap.add_argument("--extend", action="store_true",
                    help="keep the JSON's results; store this run's rows as its 'extended' curve (e.g. a longer "
                         "federation: --extend --settings federated --seeds 42 --set rounds=12)")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="--extend: wait up to this many seconds for a run writing the JSON to complete first")
    ap.add_argument("--report", action="store_true", help="no training: summarise, print and plot the JSON's rows")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: a shared machine)")
    args = ap.parse_args(argv)
    out = RESULTS / f"{NAME}.json"
    if args.report:
        old = json.loads(out.read_text())
        doc = finish({k: v for k, v in old.items() if k != "machine"}, old["rows"])
        write_json(NAME, doc)
        show(doc)
        return 0
    args.scoring = args.scoring or ("full" if args.size == "gpu" else "generate")
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    privacy.CPU = device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    p = apply_sets(SIZES[args.size], args.sets)
    command = "python bench/llm_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[dict] = []

    def write(done: bool) -> dict:
        run = {"complete": done, "command": command, "size": args.size, "sizes": p, "seeds": args.seeds,
               "settings": args.settings, "scoring": args.scoring, "device": str(device),
               "load_average": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start}
        if args.extend:
            waited = 0.0
            while done and waited < args.wait and out.is_file() and not json.loads(out.read_text()).get("complete"):
                time.sleep(30)
                waited += 30
            old = json.loads(out.read_text())
            doc = {**{k: v for k, v in old.items() if k != "machine"},
                   "extended": {**run, "curve": curve_points(rows), "rows": rows}}
        else:
            doc = finish({**run, "equal_compute": EQUAL_COMPUTE, "evaluation": EVALUATION}, rows)
        write_json(NAME, doc)
        return doc

    for seed in args.seeds:
        rows += run_seed(seed, p, args, device)
        if not args.extend:
            write(done=False)
    doc = write(done=True)
    show(doc)
    print(f"json: {out}  (total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
