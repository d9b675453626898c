"""Utility benchmark: federated vs pooled vs each site alone, at equal compute, without
DP and under DP-SGD at the sites (target epsilon 8, 3, 1), over seeds (median and
min-max spread); and, on the text task, the training modes side by side: the frozen-head
mode, LoRA, FFA-LoRA at equal bytes, and training all parameters.

Settings (part ``settings``, every task of ``--tasks``):
- federated: FedAvg weighted by examples over the task's sites, R rounds of S local
  steps at every site (what the ClientApp runs: ``bench/privacy.federate``, i.e.
  ``train_on_site`` with a real Opacus ledger per site).
- pooled: all sites' training data as one data set, trained for the sum of the sites'
  steps (N x R x S) with the same batch size and optimiser: equal compute.
- alone: each site trains R x S steps on its own data (what it computes in the
  federation), no averaging; summed over the sites that is the federation's N x R x S.
Every setting is scored on the same per-site test splits of the same partition (the
global model on each site's test, the pooled model on each site's test, each alone
model on its own site's test); the table reports the unweighted mean over sites. The
test splits carry the sites' label skew, so a site's own model also learns its test
split's label prior: the column "on every site's test" scores each alone model on all
sites' test splits too (mean over models; for federated and pooled it is the same
number as the site mean, their one model being scored on every site already). The
column "AUROC, all test images" (two-class tasks) is each model's AUROC over every site's
test split together: for federated and pooled breastmnist that is the official test split
(156 images), steadier than the site mean, whose sites hold as few as 2 malignant test
images (alone: the mean over the site models). Under
DP each training set (a site's, or the pooled one) is the protected data set, with its
own accountant, at the same target epsilon over its whole run. DP noise and Poisson
sampling draw from OS entropy (client/privacy.py): seeds fix the data split, the
partition, the initialisation and plain shuffling, not the noise.

Modes (part ``modes``, medical-abstracts): ``head`` (frozen MiniLM encoder, linear head;
``train.mode=head``), ``lora`` (LoRA r on query,value + head), ``ffa`` (FFA-LoRA:
``lora.aggregation=ffa``, A frozen at its shared seeded init and never sent; rank 2r, so
that B alone is as many bytes as LoRA's A and B: equal bytes per round, the upload is
measured and kept in the JSON), ``full`` (every parameter trains, ``train.mode=full``).
LoRA and FFA-LoRA both use lora.alpha = 2 x rank (the same scaling alpha/r).

Sizes (``--size``; ``--set key=value`` / ``--mode-set key=value`` override one preset key;
``--set dp.key=value`` one key of a preset's ``dp`` part, which applies to its DP runs only):
  CPU (default), chosen to fit a shared 2-core machine in about half an hour (measured:
  19 min for ``--tasks medical-abstracts heart-disease``, 3 seeds, no DP and eps 8/3/1;
  plus, once, 162 s to embed the 2,888 abstracts, then kept in ``--cache``, by default
  ~/.cache/fedcare/minilm_mean_embeddings.pt):
  - medical-abstracts, settings: 4 sites, Dirichlet alpha 0.3, all abstracts (2,310
    train / 578 test; the test split of the corpus, re-split 80/20 stratified per seed),
    frozen-head mode on cached MiniLM embeddings, 30 rounds x 10 local steps, batch 128,
    plain SGD lr 0.5, DP clip 1.0, delta 1e-5. Chosen by a short no-DP sweep on seeds
    42-44 (federated and pooled): with Adam (lr 0.003-0.03, batch 64-256, 10-30 rounds x
    10-30 steps) federated plateaued at about 0.58 site-mean accuracy while pooled reached
    0.60-0.62 (train_on_site builds a fresh optimiser every round, so Adam restarts its
    moments each round); SGD has no such state and FedAvg then matches pooled.
  - heart-disease, settings: FLamby's 4 centres, logistic regression, batch 4, Adam 1e-3,
    100 local steps, 5 rounds (FLamby uses 15: ``--size gpu``), DP clip 1.1, delta 1e-4.
  - breastmnist, settings (only with ``--tasks breastmnist``; 2.6 min for 3 seeds, no DP
    and eps 8/3/1, plus ~15-40 s once for the frozen features): 4 sites, Dirichlet alpha
    1.0, all images (546 train / 156 test, the official splits), head mode (frozen
    EfficientNet-Lite0 at 96 px, features cached, linear head), 10 rounds, plain SGD;
    without DP 20 local steps, batch 32, lr 0.03; under DP (the preset's ``dp`` part) 5
    local steps, batch 256 (a whole site: sample rate 1 at every site but the largest),
    lr 1.0, clip 1.0, delta 1e-3. Chosen by ``bench/breastmnist.py sweep``
    (bench/results/breastmnist.json, part ``sweep``): Adam federated reached at most 0.82
    AUROC on all test images against 0.85-0.88 pooled (it restarts every round, as for the
    text task), SGD 0.86; under DP, per-example clipping to 1 wants a ~30x larger step, and a full
    batch with few steps beat batches 32-64 and 10-20 steps.
  - medical-abstracts, modes: 4 sites, alpha 0.3, 48 train / 25 test abstracts per site,
    2 rounds x 4 local steps, batch 8, rank 8 (FFA 16), no DP, federated only; lr: head
    Adam 0.01, LoRA/FFA AdamW 1e-3 (head 1e-2), full AdamW 1e-4. LoRA and full steps cost
    about a second each on this CPU, so these runs are tiny: a smoke-level comparison,
    not a converged one.
  GPU (``--size gpu``; ``--device auto`` trains on CUDA when there is one; not yet run,
  the machine this was written on has no GPU):
  settings as above but heart-disease with FLamby's 15 rounds; modes on all abstracts, 10 rounds x 20 steps, batch 16,
  federated, pooled and alone, without DP and at epsilon 8, 3 and 1.

    python bench/utility.py                                   # CPU sizes, medical-abstracts
    python bench/utility.py --tasks medical-abstracts heart-disease --parts settings modes
    python bench/utility.py --size gpu --tasks medical-abstracts heart-disease breastmnist
    python bench/utility.py --seeds 42 --epsilons none --parts settings \
        --set rounds=1 --set max_train=16 --set max_test=8                     # smoke

Writes bench/results/utility.json (every run a row; sizes, summary and targets) and
bench/results/utility.png, and prints the table of medians [min-max] over seeds.
The JSON's rows of the (task, part, setting, mode, epsilon) groups this invocation does
not run are kept (``--no-merge``: start the JSON afresh), so one task can be rerun alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import privacy  # noqa: E402  (privacy.CPU is the device federate trains on)
from common import machine  # noqa: E402
from privacy import dp_sets, federate  # noqa: E402
from text_sweep import warm_embeddings  # noqa: E402

from fedcare.client.ledger import SiteLedger, ledger_path_for  # noqa: E402
from fedcare.client.training import train_on_site  # noqa: E402
from fedcare.config import RunConfig  # noqa: E402
from fedcare.models.base import SiteSplit  # noqa: E402
from fedcare.models.registry import get_task  # noqa: E402
from fedcare.models.state import get_trainable_state, state_nbytes  # noqa: E402
from fedcare.models.training import predict_dataset  # noqa: E402

TEXT = "medical-abstracts"
OUT = Path(__file__).resolve().parent / "results" / "utility.json"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedcare" / "minilm_mean_embeddings.pt"
SETTINGS = ("federated", "pooled", "alone")
MODES = ("head", "lora", "ffa", "full")

# preset key -> RunConfig key (rounds / local_steps depend on the setting; delta, clip and
# rank are read separately)
KEYS = {"sites": "sites", "alpha": "data.dirichlet_alpha", "max_train": "data.max_train_per_site",
        "max_test": "data.max_test_per_site", "batch_size": "train.batch_size", "lr": "train.lr",
        "head_lr": "train.head_lr", "optimizer": "train.optimizer"}

_TEXT_CPU = dict(sites=4, alpha=0.3, max_train=0, max_test=0, rounds=30, local_steps=10, batch_size=128,
                 lr=0.5, optimizer="sgd", mode="head", clip=1.0, delta=1e-5)
_HEART = dict(rounds=5, local_steps=100, batch_size=4, lr=1e-3, optimizer="adam", clip=1.1, delta=1e-4)
_BREAST_CPU = dict(sites=4, alpha=1.0, max_train=0, max_test=0, rounds=10, local_steps=20, batch_size=32,
                   lr=0.03, optimizer="sgd", mode="head", clip=1.0, delta=1e-3,
                   dp=dict(local_steps=5, batch_size=256, lr=1.0))   # under DP (for_epsilon)
SIZES = {
    "cpu": {
        "settings": {TEXT: _TEXT_CPU, "heart-disease": _HEART, "breastmnist": _BREAST_CPU},
        "modes": dict(sites=4, alpha=0.3, max_train=48, max_test=25, rounds=2, local_steps=4, batch_size=8,
                      rank=8, clip=1.0, delta=1e-5),
        "mode_epsilons": [None], "mode_settings": ["federated"],
    },
    "gpu": {
        "settings": {TEXT: _TEXT_CPU, "heart-disease": {**_HEART, "rounds": 15},
                     "breastmnist": _BREAST_CPU},
        "modes": dict(sites=4, alpha=0.3, max_train=0, max_test=0, rounds=10, local_steps=20, batch_size=16,
                      rank=8, clip=1.0, delta=1e-5),
        "mode_epsilons": [None, 8.0, 3.0, 1.0], "mode_settings": list(SETTINGS),
    },
}
# learning rate and optimiser of each mode in the modes part
MODE_HPARAMS = {"head": dict(lr=0.01, optimizer="adam", head_lr=0.0),
                "lora": dict(lr=1e-3, head_lr=1e-2, optimizer="adamw"),
                "ffa": dict(lr=1e-3, head_lr=1e-2, optimizer="adamw"),
                "full": dict(lr=1e-4, optimizer="adamw", head_lr=0.0)}
# the targets on the settings rows: name -> (task, setting, epsilon, summary metric, bound);
# breastmnist's on the site-mean AUROC (the table's AUROC) and, for reference, on the official
# test split (auroc_all_test: the federated model on all sites' test images together)
TARGETS = {"medical-abstracts federated accuracy, no DP": (TEXT, "federated", None, "accuracy", 0.60),
           "medical-abstracts federated accuracy, eps 8": (TEXT, "federated", 8.0, "accuracy", 0.55),
           "medical-abstracts federated accuracy, eps 3": (TEXT, "federated", 3.0, "accuracy", 0.50),
           "breastmnist federated AUROC (site mean), no DP": ("breastmnist", "federated", None, "auroc", 0.85),
           "breastmnist federated AUROC (site mean), eps 8": ("breastmnist", "federated", 8.0, "auroc", 0.75),
           "breastmnist federated AUROC (all test images), no DP": ("breastmnist", "federated", None, "auroc_all_test", 0.85),
           "breastmnist federated AUROC (all test images), eps 8": ("breastmnist", "federated", 8.0, "auroc_all_test", 0.75)}
FED_OVER_POOLED = 0.95


# ------------------------------------------------------------------------- configs
def make_config(task: str, p: dict, mode: str | None, seed: int, eps: float | None,
                rounds: int, local_steps: int) -> RunConfig:
    flat = {**get_task(task).settings("lora"), "task": task, "seed": seed, "rounds": rounds, "train.local_steps": local_steps,
            **{KEYS[k]: v for k, v in p.items() if k in KEYS},
            **dp_sets(eps, p["delta"], p["clip"], "prv")}
    if mode is not None:
        flat["train.mode"] = "lora" if mode in ("lora", "ffa") else mode
    if mode in ("lora", "ffa"):
        rank = p.get("rank", 8) * (2 if mode == "ffa" else 1)   # FFA: B only, twice the rank = the same bytes
        flat.update({"lora.r": rank, "lora.alpha": 2 * rank, "lora.aggregation": "ffa" if mode == "ffa" else "naive"})
    return RunConfig.from_flat(flat).validate()


# ------------------------------------------------------------------------ settings
def evaluate(task, model, splits: dict, cfg: RunConfig) -> tuple[dict, dict]:
    """Per-site test metrics of one model (numbers only), as ``federate`` reports them,
    and its metrics over every site's test split together (``all_test_metrics``)."""
    out, seen = {}, []
    for s, split in splits.items():
        scores, labels = predict_dataset(task, model, split.test, cfg, privacy.CPU)
        seen.append((scores, labels))
        m = task.metrics(scores, labels)
        out[s] = {**{k: float(v) for k, v in m.items() if isinstance(v, (int, float))}, "n_test": int(len(labels))}
    return out, all_test_metrics(task, seen)


def all_test_metrics(task, seen: list) -> dict:
    """Metrics of one model's (scores, labels) over all the test splits it was scored on,
    together: for a partition of an official test split (breastmnist), that split."""
    if not seen:
        return {}
    m = task.metrics(np.concatenate([sc for sc, _ in seen]), np.concatenate([y for _, y in seen]))
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}


@contextmanager
def recorded_predictions() -> Iterator[list]:
    """Every (scores, labels) that ``federate`` predicts: its final evaluation of the
    global model on each site's test split (training never predicts)."""
    seen: list = []
    original = privacy.predict_dataset

    def recording(*a, **kw):
        out = original(*a, **kw)
        seen.append(out)
        return out

    privacy.predict_dataset = recording
    try:
        yield seen
    finally:
        privacy.predict_dataset = original


def _train_alone(task, cfg: RunConfig, data: SiteSplit, ledger_dir: Path, run_id: str):
    """One model trained on ``data`` alone: one round of ``cfg.train.local_steps`` steps
    through ``train_on_site`` (what the ClientApp runs; DP: its own ledger)."""
    model = task.build_model(cfg).to(privacy.CPU)
    out = train_on_site(task, model, data, cfg, privacy.CPU, run_id=run_id, server_round=1,
                        ledger=SiteLedger(ledger_path_for(ledger_dir, data.site_id)), budget=0.0,
                        dataset_id=data.site_id)
    return model, out.privacy


def pooled(cfg: RunConfig, ledger_dir: Path, run_id: str) -> dict:
    """All sites' training splits as one data set (under DP the pooled set is the
    protected one); scored on every site's own test split."""
    task = get_task(cfg.task)
    splits = {s: task.load_site(s, cfg) for s in task.site_ids(cfg)}
    data = SiteSplit("pooled", ConcatDataset([sp.train for sp in splits.values()]),
                     ConcatDataset([sp.test for sp in splits.values()]))
    model, priv = _train_alone(task, cfg, data, ledger_dir, run_id)
    scores, every = evaluate(task, model, splits, cfg)
    return {"per_site": scores, "privacy": {"pooled": priv}, "all_sites": summarise_sites(scores), "all_test": every}


def alone(cfg: RunConfig, ledger_dir: Path, run_id: str) -> dict:
    """Each site trains on its own training split only, no averaging. ``per_site``: each
    site's model on its own test split (what that hospital gets alone); ``all_sites``:
    the mean over the site models of their scores on every site's test split (``all_test``:
    on all of them together)."""
    task = get_task(cfg.task)
    splits = {s: task.load_site(s, cfg) for s in task.site_ids(cfg)}
    per_site, priv, cross, every = {}, {}, [], []
    for s, split in splits.items():
        model, priv[s] = _train_alone(task, cfg, split, ledger_dir, run_id)
        scores, all_test = evaluate(task, model, splits, cfg)
        per_site[s] = scores[s]
        cross.append(summarise_sites(scores))
        every.append(all_test)
    return {"per_site": per_site, "privacy": priv,
            "all_sites": {k: float(np.mean([c[k] for c in cross])) for k in cross[0]},
            "all_test": {k: float(np.mean([e[k] for e in every])) for k in every[0] if all(k in e for e in every)}}


def summarise_sites(per_site: dict) -> dict:
    """Unweighted mean over sites of each metric, the test-size-weighted accuracy (= over
    all test examples together) and the worst site's accuracy."""
    out = {}
    for k in ("accuracy", "macro_f1", "balanced_accuracy", "auroc"):
        vals = [m[k] for m in per_site.values() if k in m]
        if len(vals) == len(per_site):
            out[k] = float(np.mean(vals))
    n = np.array([m["n_test"] for m in per_site.values()], dtype=float)
    out["accuracy_all_test"] = float(np.average([m["accuracy"] for m in per_site.values()], weights=n))
    out["worst_site_accuracy"] = float(min(m["accuracy"] for m in per_site.values()))
    return out


_BYTES: dict[tuple, int] = {}


def upload_bytes(cfg: RunConfig, mode: str | None) -> int:
    """Bytes of the trainable state one site sends per round (float32)."""
    key = (cfg.task, mode, cfg.lora.r, cfg.lora.aggregation)
    if key not in _BYTES:
        _BYTES[key] = state_nbytes(get_trainable_state(get_task(cfg.task).build_model(cfg)))
    return _BYTES[key]


def run_one(task_name: str, part: str, setting: str, mode: str | None, eps: float | None, seed: int,
            p: dict) -> dict:
    task = get_task(task_name)
    p = for_epsilon(p, eps)
    R, S = p["rounds"], p["local_steps"]
    fed_cfg = make_config(task_name, p, mode, seed, eps, R, S)
    sites = task.site_ids(fed_cfg)
    n = len(sites)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if setting == "federated":
            cfg, steps_per_model = fed_cfg, R * S
            with recorded_predictions() as seen:
                res = federate(cfg, Path(tmp), f"utility-fed-{seed}")
            res["all_test"] = all_test_metrics(task, seen)
        elif setting == "pooled":
            cfg, steps_per_model = make_config(task_name, p, mode, seed, eps, 1, n * R * S), n * R * S
            res = pooled(cfg, Path(tmp), f"utility-pooled-{seed}")
        else:
            cfg, steps_per_model = make_config(task_name, p, mode, seed, eps, 1, R * S), R * S
            res = alone(cfg, Path(tmp), f"utility-alone-{seed}")
    wall = time.perf_counter() - t0
    priv = [q for q in res["privacy"].values() if q]
    mine = summarise_sites(res["per_site"])
    every = res.get("all_sites", mine)   # federated: one model, already scored on every site's test
    return {"task": task_name, "part": part, "setting": setting, "mode": mode, "epsilon": eps, "seed": seed,
            **mine, "accuracy_all_sites": every["accuracy"], "macro_f1_all_sites": every["macro_f1"],
            "auroc_all_test": res["all_test"].get("auroc"),
            "steps_total": n * R * S, "steps_per_model": steps_per_model, "sites": n, "rounds": R, "local_steps": S,
            "batch_size": p["batch_size"], "lr": p["lr"], "optimizer": p["optimizer"],
            "upload_bytes_per_site_round": upload_bytes(fed_cfg, mode) if setting == "federated" else None,
            "epsilon_spent_max": max(q["epsilon"] for q in priv) if priv else None,
            "noise_multiplier": {s: q["noise_multiplier"] for s, q in res["privacy"].items() if q} or None,
            "wall_s": wall, "per_site": res["per_site"]}


# -------------------------------------------------------------------------- output
def _eps_label(eps: float | None) -> str:
    return "no DP" if eps is None else f"eps {eps:g}"


def _eps_order(eps: float | None) -> tuple:
    return (0, 0.0) if eps is None else (1, -eps)     # no DP, then the largest epsilon first


def _key(r: dict) -> tuple:
    """Sort and group key: part (settings first), task, setting, mode, epsilon."""
    return (r["part"] != "settings", r["task"], SETTINGS.index(r["setting"]),
            MODES.index(r["mode"]) if r["mode"] in MODES else -1, _eps_order(r["epsilon"]))


def summary(rows: list[dict]) -> list[dict]:
    """Median and min-max over seeds per (task, part, setting, mode, epsilon)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for key in sorted(groups):
        rs = groups[key]
        s = {"task": rs[0]["task"], "part": rs[0]["part"], "setting": rs[0]["setting"], "mode": rs[0]["mode"],
             "epsilon": rs[0]["epsilon"], "seeds": [r["seed"] for r in rs], "steps_total": rs[0]["steps_total"],
             "steps_per_model": rs[0]["steps_per_model"],
             "upload_bytes_per_site_round": rs[0]["upload_bytes_per_site_round"],
             "wall_s_median": statistics.median(r["wall_s"] for r in rs)}
        for m in ("accuracy", "macro_f1", "balanced_accuracy", "auroc", "accuracy_all_test", "worst_site_accuracy",
                  "accuracy_all_sites", "macro_f1_all_sites", "auroc_all_test"):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                s[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out.append(s)
    return out


def _spread(d: dict | None) -> str:
    return "-" if not d else f"{d['median']:.4f} [{d['min']:.4f}-{d['max']:.4f}]"


def table(summ: list[dict]) -> str:
    heads = ["task", "part", "setting", "mode", "DP", "n", "accuracy (site mean)", "macro-F1 (site mean)",
             "bal. acc / AUROC", "AUROC, all test images", "acc. on every site's test", "steps", "upload B", "s"]
    cells = []
    for s in summ:
        third = _spread(s.get("auroc")) if "auroc" in s else _spread(s.get("balanced_accuracy"))
        cells.append([s["task"], s["part"], s["setting"], s["mode"] or "-", _eps_label(s["epsilon"]), str(len(s["seeds"])),
                      _spread(s.get("accuracy")), _spread(s.get("macro_f1")),
                      ("AUROC " if "auroc" in s else "bal ") + third, _spread(s.get("auroc_all_test")),
                      _spread(s.get("accuracy_all_sites")),
                      str(s["steps_total"]), f"{s['upload_bytes_per_site_round']:,}" if s["upload_bytes_per_site_round"] else "-",
                      f"{s['wall_s_median']:.0f}"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def check_targets(summ: list[dict]) -> list[dict]:
    """The issue's targets (medians over seeds), where measured."""
    def med(task, setting, eps, metric):
        for s in summ:
            if s["task"] == task and s["part"] == "settings" and s["setting"] == setting and s["epsilon"] == eps:
                return s[metric]["median"] if metric in s else None
        return None
    out = []
    for name, (task, setting, eps, metric, bound) in TARGETS.items():
        v = med(task, setting, eps, metric)
        out.append({"target": f"{name} >= {bound:g}", "value": v, "met": None if v is None else v >= bound})
    fed, pool = med(TEXT, "federated", None, "accuracy"), med(TEXT, "pooled", None, "accuracy")
    ratio = fed / pool if fed is not None and pool else None
    out.append({"target": f"medical-abstracts federated >= {FED_OVER_POOLED:g} x pooled, no DP", "value": ratio,
                "met": None if ratio is None else ratio >= FED_OVER_POOLED})
    return out


def plot(summ: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]); no plot"
    panels = sorted({(s["task"], s["part"]) for s in summ}, key=lambda k: (k[1] != "settings", k[0]))
    if not panels:
        return "nothing to plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    # (label, setting, summary metric suffix, colour, hatch); "alone, every site's test": each
    # alone model scored on all sites' test splits (accuracy panels only); "all test images":
    # the one model's AUROC over every site's test split together (AUROC panels, where measured)
    series_all = [("federated", "federated", "", "C0", None), ("pooled", "pooled", "", "C1", None),
                  ("alone (own test)", "alone", "", "C2", None),
                  ("alone (every site's test)", "alone", "_all_sites", "C2", "//"),
                  ("federated (all test images)", "federated", "_all_test", "C0", "//"),
                  ("pooled (all test images)", "pooled", "_all_test", "C1", "//")]
    for ax, (task, part) in zip(axes.flat, panels):
        rows = [s for s in summ if s["task"] == task and s["part"] == part]
        metric = "auroc" if all("auroc" in s for s in rows) else "accuracy"
        groups = sorted({(s["mode"] or "", s["epsilon"]) for s in rows},
                        key=lambda g: (MODES.index(g[0]) if g[0] in MODES else -1, _eps_order(g[1])))
        series = [x for x in series_all if (x[2] != "_all_test" or metric == "auroc")
                  and any(s["setting"] == x[1] and metric + x[2] in s for s in rows)]
        width = 0.8 / len(series)
        for j, (label, setting, suffix, colour, hatch) in enumerate(series):
            key = metric + suffix
            xs, ys, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                s = next((s for s in rows if s["setting"] == setting and (s["mode"] or "", s["epsilon"]) == g), None)
                if s and key in s:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(s[key]["median"])
                    lo.append(s[key]["median"] - s[key]["min"])
                    hi.append(s[key]["max"] - s[key]["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label, color=colour, hatch=hatch,
                   edgecolor="white" if hatch else None)
        ax.set_xticks(range(len(groups)))

        def tick(m: str, e: float | None) -> str:
            if part != "modes":
                return _eps_label(e)
            up = next((s["upload_bytes_per_site_round"] for s in rows if s["mode"] == m and s["upload_bytes_per_site_round"]), None)
            return f"{m}\n{_eps_label(e)}" + (f"\n{up / 1e3:,.0f} kB/round" if up else "")

        ax.set_xticklabels([tick(m, e) for m, e in groups], fontsize=8)
        ax.set_ylabel(f"{metric}, site mean (median, min-max over seeds)")
        ax.set_title(f"{task}: {'training modes' if part == 'modes' else 'federated vs pooled vs alone'}", fontsize=10)
        if part == "settings":
            for bound in sorted({t[4] for t in TARGETS.values() if t[0] == task and t[3] == metric}):
                ax.axhline(bound, ls=":", lw=0.8, c="gray")
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------- main
def parse_eps(values: list[str]) -> list[float | None]:
    return [None if v.lower() in ("none", "0", "inf") else float(v) for v in values]


def apply_sets(p: dict, sets: list[str]) -> dict:
    """``key=value`` overrides of a preset; ``dp.key=value`` overrides what the preset's
    ``dp`` part sets for the DP runs only."""
    p = {**p, "dp": dict(p["dp"])} if "dp" in p else dict(p)
    for item in sets:
        k, _, v = item.partition("=")
        target, key = (p.setdefault("dp", {}), k[3:]) if k.startswith("dp.") else (p, k)
        if key not in p and key not in KEYS and key not in ("rank",) or key == "dp":
            raise SystemExit(f"--set {item}: unknown key {k} (one of {', '.join(sorted(set(p) | set(KEYS)))})")
        old = target.get(key, p.get(key))
        target[key] = v if isinstance(old, str) or key == "optimizer" else (int(v) if isinstance(old, int) else float(v))
    return p


def for_epsilon(p: dict, eps: float | None) -> dict:
    """The preset a run uses: under DP with the preset's ``dp`` part applied (DP-SGD clips
    every example's gradient to dp.max_grad_norm, so it wants its own learning rate,
    batch and steps), without the part otherwise."""
    return {**{k: v for k, v in p.items() if k != "dp"}, **(p.get("dp", {}) if eps is not None else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=[TEXT], choices=[TEXT, "heart-disease", "breastmnist"])
    ap.add_argument("--parts", nargs="+", default=["settings", "modes"], choices=["settings", "modes"],
                    help="modes runs on medical-abstracts only (when it is among --tasks)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--epsilons", nargs="+", default=["none", "8", "3", "1"], help="DP targets; none = without DP")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="text modes part")
    ap.add_argument("--mode-epsilons", nargs="+", help="DP targets of the modes part (default: the size's)")
    ap.add_argument("--mode-settings", nargs="+", choices=SETTINGS, help="settings of the modes part (default: the size's)")
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a settings-part preset key for every task (rounds, local_steps, batch_size, lr, ...)")
    ap.add_argument("--mode-set", dest="mode_sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a modes-part preset key")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE),
                    help="file keeping the frozen MiniLM embeddings between invocations ('' = none)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the JSON's rows of the (task, part, setting, mode, epsilon) groups not run now "
                         "(default; --no-merge starts the JSON afresh)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    privacy.CPU = device   # federate and train_on_site train and evaluate on privacy.CPU
    threads = max(1, os.cpu_count() or 1)
    size = SIZES[args.size]
    eps_list = parse_eps(args.epsilons)
    mode_eps = parse_eps(args.mode_epsilons) if args.mode_epsilons else size["mode_epsilons"]
    mode_settings = args.mode_settings or size["mode_settings"]
    presets = {t: apply_sets(size["settings"][t], args.sets) for t in args.tasks}
    mode_p = {m: apply_sets({**size["modes"], **MODE_HPARAMS[m]}, args.mode_sets) for m in args.modes}

    plan: list[tuple] = []   # (task, part, setting, mode, eps, preset)
    if "settings" in args.parts:
        for t in args.tasks:
            mode = presets[t].get("mode")
            plan += [(t, "settings", st, mode, e, presets[t]) for e in eps_list for st in args.settings]
    if "modes" in args.parts and TEXT in args.tasks:
        for m in args.modes:
            plan += [(TEXT, "modes", st, m, e, mode_p[m]) for e in mode_eps for st in mode_settings]

    # The frozen-head mode embeds each abstract once per process (MeanPoolClassifier's
    # cache): read every embedding from --cache, or compute them all up front (and keep
    # them there) when a head-mode run uses the whole corpus; capped runs embed lazily.
    embed_s = None
    cache = Path(args.cache).expanduser() if args.cache else None
    heads = [p for t, _, _, m, _, p in plan if t == TEXT and m == "head"]
    if heads and ((cache and cache.is_file()) or any(not p.get("max_train") or not p.get("max_test") for p in heads)):
        torch.set_num_threads(threads)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
        cfg0 = make_config(TEXT, {**_TEXT_CPU, "max_train": 0, "max_test": 0}, "head", args.seeds[0], None, 1, 1)
        embed_s = warm_embeddings(cfg0, cache)
        print(f"frozen embeddings ready ({embed_s:.0f} s{'; read from ' + str(cache) if cache and not embed_s else ''})",
              flush=True)

    # Head-mode breastmnist: the frozen backbone's features of every image, once, with every
    # thread (the runs then train a linear head on one thread)
    features_s = None
    if any(t == "breastmnist" and m == "head" for t, _, _, m, _, _ in plan):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            federate(make_config("breastmnist", {**presets["breastmnist"], "max_train": 0, "max_test": 0}, "head",
                                 args.seeds[0], None, 1, 1), Path(tmp), "warm")
        features_s = time.perf_counter() - t0
        print(f"breastmnist frozen features ready ({features_s:.0f} s)", flush=True)

    kept: list[dict] = []
    kept_sizes: dict = {}      # the settings presets of the kept rows' tasks
    kept_modes: dict = {}      # the modes part's sizes, when only its kept rows are in the JSON
    earlier: list[dict] = []   # the invocations whose rows are kept
    command = "python bench/utility.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        running = {(t, part, st, m, e) for t, part, st, m, e, _ in plan}
        kept = [r for r in old.get("rows", []) if (r["task"], r["part"], r["setting"], r["mode"], r["epsilon"]) not in running]
        old_sizes = old.get("sizes") or {}
        kept_sizes = {t: v for t, v in old_sizes.get("settings", {}).items()
                      if t not in presets and any(r["task"] == t and r["part"] == "settings" for r in kept)}
        if not any(part == "modes" for _, part, *_ in plan) and any(r["part"] == "modes" for r in kept):
            kept_modes = {k: old_sizes[k] for k in ("modes", "mode_epsilons", "mode_settings") if k in old_sizes}
        earlier = old.get("invocations") or [{"command": old.get("command"), "when": old.get("machine", {}).get("when"),
                                              "size": old.get("size"), "wall_s": old.get("wall_s"),
                                              "embed_seconds": old.get("embed_seconds"), "runs": len(old.get("rows", []))}]
        for r in kept:   # rows written before the *_all_sites columns: one model, already scored on every site
            if r["setting"] != "alone":
                r.setdefault("accuracy_all_sites", r["accuracy"])
                r.setdefault("macro_f1_all_sites", r["macro_f1"])
    rows: list[dict] = []

    def write(done: bool) -> dict:
        all_rows = kept + rows
        summ = summary(all_rows)
        doc = {"complete": done, "size": args.size, "device": str(device), "machine": machine(),
               "load_average": list(os.getloadavg()), "cpus": os.cpu_count(),
               "invocations": earlier + [{"command": command, "when": machine()["when"], "size": args.size,
                                          "wall_s": time.perf_counter() - t_start, "embed_seconds": embed_s,
                                          "features_seconds": features_s, "runs": len(rows)}],
               "sizes": {"settings": {**kept_sizes, **presets}, "modes": mode_p,
                         "mode_epsilons": mode_eps, "mode_settings": mode_settings, **kept_modes,
                         "seeds": args.seeds, "epsilons": eps_list},
               "equal_compute": "pooled: N x R x S steps on all training data; alone: R x S steps per site "
                                "(N x R x S over the sites); federated: R rounds x S steps at each of N sites",
               "evaluation": "every model on the per-site test splits of the same partition; unweighted mean over "
                             "sites (accuracy_all_test: weighted by test size); alone: each site's model on its own test; "
                             "*_all_sites: each model on every site's test (alone: mean over the site models); "
                             "auroc_all_test: each model's AUROC over every site's test examples together (federated, "
                             "pooled: one model; breastmnist: the official test split; alone: mean over the site models)",
               "ffa": "FFA-LoRA = lora.aggregation=ffa (models/adapters.freeze_lora_a: A frozen, never sent), "
                      "rank 2r vs LoRA rank r: equal upload bytes (upload_bytes_per_site_round)",
               "summary": summ, "targets": check_targets(summ), "rows": all_rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=float))
        return doc

    print(f"{len(plan) * len(args.seeds)} runs", flush=True)
    for task, part, setting, mode, eps, p in plan:
        # a linear head over cached embeddings or a 14-weight model: threads only spin
        light = task == "heart-disease" or mode == "head"
        torch.set_num_threads(1 if light and device.type == "cpu" else threads)
        for seed in args.seeds:
            row = run_one(task, part, setting, mode, eps, seed, p)
            rows.append(row)
            extra = f" AUROC {row['auroc']:.4f}" if "auroc" in row else ""
            print(f"  {task} {part} {setting:9} {mode or '-':4} {_eps_label(eps):6} seed {seed}: "
                  f"acc {row['accuracy']:.4f} F1 {row['macro_f1']:.4f}{extra} ({row['wall_s']:.1f} s)", flush=True)
            write(done=False)
    doc = write(done=True)
    print(table(doc["summary"]))
    for t in doc["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.4f}"
        print(f"target {t['target']}: {v} -> {'not measured' if t['met'] is None else 'met' if t['met'] else 'NOT met'}")
    problem = plot(doc["summary"], args.out.with_suffix(".png"))
    print(problem or f"plot: {args.out.with_suffix('.png')}")
    print(f"json: {args.out}  (total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
