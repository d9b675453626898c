"""A realistic store for the dashboard's tests and screenshots, filled through the
real ``Store`` API with rounds computed from real data.

Models are scikit-learn SGD logistic regressions trained round by round on the real
Fed-Heart-Disease hospitals and on the real medical-abstracts corpus (TF-IDF, split
over 4 virtual sites); every evaluation, fairness object (``site_counts`` at each
site, ``aggregate`` at the server) and privacy dict is computed from their actual
predictions. DP runs perturb the weights with noise that grows as epsilon shrinks
and account a made-up but monotone epsilon per site; this is data for the dashboard,
not a DP experiment.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from fedcare.config import RunConfig
from fedcare.models.fairness import aggregate, site_counts
from fedcare.models.metrics import classification_metrics
from fedcare.schemas import ACCEPTED, REFUSED, REJECTED, Evaluation, RoundRecord, SiteRound
from fedcare.server.store import Store


@dataclass
class SiteData:
    site: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    groups: dict[str, np.ndarray]


PRIOR_SPEND = (0.0, 0.15, 0.6, 0.3)


def heart_sites() -> list[SiteData]:
    from fedcare.models.registry import get_task

    task, cfg = get_task("heart-disease"), RunConfig()
    out = []
    for site in task.site_ids(cfg):
        split = task.load_site(site, cfg)
        (xtr, ytr), (xte, yte) = (t.numpy() for t in split.train.tensors), (t.numpy() for t in split.test.tensors)
        out.append(SiteData(site, xtr, ytr.astype(int), xte, yte.astype(int), split.groups))
    return out


def abstracts_sites(num_sites: int = 4, seed: int = 0) -> list[SiteData]:
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer

    from fedcare.models.data import bundled_dir

    df = pd.read_csv(bundled_dir("medical-abstracts") / "medical_tc_test.csv")
    x = TfidfVectorizer(max_features=1500, sublinear_tf=True).fit_transform(df["medical_abstract"]).toarray()
    y = df["condition_label"].to_numpy() - 1
    rng = np.random.default_rng(seed)
    site_of = np.empty(len(y), dtype=int)
    for label in np.unique(y):  # Dirichlet(0.5) label skew over the sites
        idx = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet([0.5] * num_sites))[:-1] * len(idx)).astype(int)
        for s, part in enumerate(np.split(idx, cuts)):
            site_of[part] = s
    out = []
    for s in range(num_sites):
        idx = rng.permutation(np.flatnonzero(site_of == s))
        cut = int(0.8 * len(idx))
        out.append(SiteData(f"site-{s}", x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]], {}))
    return out


@dataclass
class Softmax:
    """Multinomial logistic regression in numpy (binary tasks use two classes)."""

    w: np.ndarray
    b: np.ndarray

    def probs(self, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        logits = x @ (self.w if noise is None else self.w + noise) + self.b
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def local_epoch(self, x: np.ndarray, y: np.ndarray, lr: float, rng, batch: int = 8) -> "Softmax":
        w, b = self.w.copy(), self.b.copy()
        onehot = np.eye(w.shape[1])[y]
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // batch)):
            logits = x[idx] @ w + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            g = p / p.sum(axis=1, keepdims=True) - onehot[idx]
            w -= lr * (x[idx].T @ g / len(idx) + 1e-3 * w)
            b -= lr * g.mean(axis=0)
        return Softmax(w, b)


def _fedavg_rounds(sites: list[SiteData], rounds: int, classes: int, rng, lr: float):
    """Yield (round, global model) of real FedAvg: one local epoch per site, then the
    example-weighted mean of the sites' models."""
    model = Softmax(np.zeros((sites[0].x_train.shape[1], classes)), np.zeros(classes))
    for rnd in range(1, rounds + 1):
        local = [model.local_epoch(s.x_train, s.y_train, lr, rng) for s in sites]
        n = np.array([len(s.y_train) for s in sites], dtype=float)
        model = Softmax(sum(m.w * k for m, k in zip(local, n)) / n.sum(), sum(m.b * k for m, k in zip(local, n)) / n.sum())
        yield rnd, model


def write_run(store: Store, task: str, sites: list[SiteData], rounds: int, *, strategy: str = "fedavg",
              epsilon: float = 0.0, budget: float = 0.0, rounds_planned: int | None = None,
              local: bool = False, reject_round: int | None = None, status: str = "completed",
              seed: int = 42, min_group_size: int = 5) -> str:
    """One run written round by round; returns its id."""
    classes = 2 if task == "heart-disease" else 5
    cfg = RunConfig(task=task, rounds=rounds_planned or rounds, sites=len(sites), seed=seed)
    cfg.strategy.name = strategy
    cfg.site.min_group_size = min_group_size
    if epsilon:
        cfg.dp.level, cfg.dp.epsilon, cfg.dp.delta, cfg.site.budget = "sample", epsilon, 1e-4, budget
    run_id = store.create_run(task, strategy, cfg.to_dict(), code_version="demo", status="running")
    store.add_event(run_id, "started", f"{len(sites)} sites, {cfg.rounds} rounds")
    rng = np.random.default_rng(seed)
    t0 = time.time() - 60 * rounds
    spent = {s.site: 0.0 for s in sites}
    earlier = {s.site: PRIOR_SPEND[i % len(PRIOR_SPEND)] for i, s in enumerate(sites)}  # other runs' spend
    nbytes = (sites[0].x_train.shape[1] + 1) * classes * 4
    lr = 0.001 if classes == 2 else 3.0
    for rnd, model in _fedavg_rounds(sites, rounds, classes, rng, lr):
        noise = rng.normal(0, 0.3 / epsilon, model.w.shape) if epsilon else None
        site_rows, evals, counts, totals, n_total = [], [], {}, {}, 0
        for s in sites:
            row = SiteRound(site=s.site, status=ACCEPTED, num_examples=len(s.y_train), update_bytes=nbytes,
                            duration_s=float(0.4 + 0.1 * len(s.y_train) / 100 + rng.random() * 0.2),
                            train_loss=classification_metrics(model.probs(s.x_train, noise), s.y_train)["loss"])
            if epsilon:
                step = epsilon / rounds
                lifetime = earlier[s.site] + spent[s.site]
                if budget and lifetime + step > budget:
                    row.status, row.reason = REFUSED, (f"privacy budget {budget:g} would be exceeded "
                                                       f"(spent {lifetime:.2f}, round needs {step:.2f})")
                    row.num_examples, row.update_bytes, row.train_loss = 0, 0, None
                else:
                    spent[s.site] += step
                row.privacy = {"epsilon": round(earlier[s.site] + spent[s.site], 6), "run_epsilon": round(spent[s.site], 6),
                               "delta": 1e-4, "budget": budget or None, "accountant": "prv",
                               "noise_multiplier": round(1.1 / epsilon + 0.5, 4), "sample_rate": 0.02,
                               "steps": 100 * rnd, "round_steps": 100}
            if reject_round == rnd and s is sites[-1]:
                row.status, row.reason = REJECTED, "non-finite values in 'weight' (nan)"
            site_rows.append(row)
            probs = model.probs(s.x_test, noise)
            m = classification_metrics(probs, s.y_test)
            evals.append(Evaluation(scope=s.site, metrics=m, num_examples=len(s.y_test)))
            if local:
                personal = model.local_epoch(s.x_train, s.y_train, lr, rng).probs(s.x_test)
                evals.append(Evaluation(scope=s.site, metrics=classification_metrics(personal, s.y_test),
                                        num_examples=len(s.y_test), kind="local"))
            counts[s.site] = site_counts(probs, s.y_test, s.groups, min_group_size, s.site)
            n_total += len(s.y_test)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * len(s.y_test)
        glob = {k: v / n_total for k, v in totals.items()}
        glob["worst_site_accuracy"] = min(e.metrics["accuracy"] for e in evals if e.kind == "federated")
        evals.insert(0, Evaluation(scope="global", metrics=glob, num_examples=n_total))
        if local:
            local_rows = [e for e in evals if e.kind == "local"]
            evals.insert(1, Evaluation(scope="global", kind="local", num_examples=n_total, metrics={
                k: sum(e.metrics[k] * e.num_examples for e in local_rows) / n_total for k in local_rows[0].metrics}))
        accepted = [r for r in site_rows if r.accepted]
        store.write_round(run_id, RoundRecord(
            round=rnd, started_at=t0 + 60 * rnd, ended_at=t0 + 60 * rnd + 20,
            metrics={"train_loss": float(np.mean([r.train_loss for r in accepted])) if accepted else None},
            sites=site_rows, evaluations=evals,
            global_state={"weight": model.w.astype(np.float32), "bias": model.b.astype(np.float32)},
            fairness=aggregate(counts)))
        for r in site_rows:
            if not r.accepted:
                store.add_event(run_id, r.status, f"round {rnd}: {r.site} {r.status}: {r.reason}")
    if status == "completed":
        store.set_status(run_id, "completed")
        store.add_event(run_id, "completed", f"{rounds} rounds")
    elif status == "failed":
        store.set_status(run_id, "failed", "SuperLink stopped responding")
        store.add_event(run_id, "failed", "SuperLink stopped responding")
    return run_id


def build_demo_store(url: str) -> dict[str, str]:
    """Fill the store at ``url``; returns label -> run id. Runs: heart-disease fedavg
    without DP and at epsilon 1 and 8 (same experiment otherwise), a live fedprox run
    with a personalised (local) evaluation and a rejected update, medical-abstracts
    (no sensitive attributes) and a failed run with no evaluation yet."""
    heart, abstracts = heart_sites(), abstracts_sites()
    with Store(url) as store:
        ids = {
            "plain": write_run(store, "heart-disease", heart, 12),
            "eps1": write_run(store, "heart-disease", heart, 12, epsilon=1.0, budget=1.2, reject_round=4),
            "eps8": write_run(store, "heart-disease", heart, 12, epsilon=8.0),
            "abstracts": write_run(store, "medical-abstracts", abstracts, 6, rounds_planned=6),
            "live": write_run(store, "heart-disease", heart, 5, strategy="fedprox", rounds_planned=12,
                              local=True, reject_round=3, status="running"),
        }
        failed = store.create_run("heart-disease", "fedadam", RunConfig().to_dict(), "demo", status="running")
        store.set_status(failed, "failed", "site cleveland: data file checksum mismatch")
        store.add_event(failed, "failed", "site cleveland: data file checksum mismatch")
        ids["failed"] = failed
    return ids


if __name__ == "__main__":  # python tests/dashboard_demo.py sqlite:///demo.db
    import sys

    print(build_demo_store(sys.argv[1]))


def demo_store_url(folder) -> str:
    """The store the dashboard tests read: $FEDCARE_TEST_DB (e.g. a store from real
    `fedcare simulate` runs) if set, else a demo store built in ``folder``."""
    if os.environ.get("FEDCARE_TEST_DB"):
        return os.environ["FEDCARE_TEST_DB"]
    url = f"sqlite:///{folder / 'demo.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_demo_store(url)
    return url
