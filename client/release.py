"""What a site's evaluation releases: counts with noise, charged to the site's ledger.

An evaluation reply is a query against the site's test patients, and the coordinator
chooses the model: one that scores 1 for a single patient turns ``accuracy``,
``selection_rate`` or ``fpr`` into that patient's diagnosis. So, when the site's policy
asks for it (``[evaluation] release = "noised"``, the default of every policy file),
the site releases only counts it has protected, and metrics derived from them:

* per cell (the overall test split, and each group of each sensitive attribute when the
  policy sends group counts) the site counts a confusion matrix (true class x predicted
  class) and, per scored class, a joint histogram (true or not x score bin). One
  patient's record lies in one entry of each; replacing it by another record changes at
  most two entries of each by one. Over ``1 + A`` cell layers (overall + A attributes)
  and ``1 + K`` histograms per cell (K scored classes), the L2 sensitivity under
  replacement is ``sqrt(2 (1 + K) (1 + A))``;
* Gaussian noise of standard deviation ``z * sensitivity`` is added to every count,
  with ``z`` calibrated so that one release is ``(evaluation_epsilon, delta)``-DP
  (RDP accountant). For add/remove neighbours the same release has noise multiplier
  ``z * sqrt(2)``; the ledger is charged ``z`` (one Gaussian step at sample rate 1):
  an over-count, never an under-count;
* everything sent is computed from the noisy counts (post-processing): ``num-examples``,
  ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and ``auroc`` (from the histogram)
  from the rounded counts as they are (clipping each at 0 first would bias every ratio),
  each clipped to [0, 1]; the fairness counts rounded and clipped at 0. ``loss``, the
  personalised model's metrics and task-specific extras (exact match, perplexity) cannot
  be derived from the counts and are not sent.

Before any release the site checks, in this order: the evaluations of this run so far
against ``max_evaluations_per_run``; the model against the ones it knows
(``evaluate_only_known_models``: a global state it received in a train message of this
run, or the aggregate of a round it trained in, evaluated once); the overall test split
against ``min_cell_size``; the run's evaluation epsilon with this release against
``max_evaluation_epsilon_per_run``; the lifetime epsilon (training and evaluation)
against ``epsilon_cap``. The spend is written to the ledger before anything is sent.

What a site remembers for this (digests of the models it received, rounds it trained
in, evaluations it answered) lives in ``<site>.release.sqlite`` next to its ledger.
Without a policy (a simulation's virtual sites) evaluation releases exact metrics, as
before; ``release = "exact"`` in a policy does the same knowingly.
"""
from __future__ import annotations

import functools
import math
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcare.accounting import epsilon_of
from fedcare.errors import PolicyRefusal, PrivacyError
from fedcare.models.fairness import CLASS_ATTRIBUTE, VERSION, histogram_auroc, suppressed_groups

RELEASES = ("noised", "exact", "none")
ACCOUNTANT = "rdp"
BINS = 10
EVALUATION_RUN = "{run_id}/evaluation"   # the ledger's account of a run's evaluations


@dataclass(frozen=True)
class Rules:
    """The policy's release rules, as one value the release functions take."""

    release: str
    epsilon: float
    max_epsilon_per_run: float
    max_evaluations: int
    min_cell_size: int
    only_known_models: bool
    send_group_counts: bool
    min_group_size: int
    delta: float
    epsilon_cap: float

    @classmethod
    def of(cls, policy, run_min_group_size: int = 0, num_records: int = 0) -> "Rules | None":
        """The rules of ``policy``; None without a policy (exact release, as before).
        Delta: the site's (``SitePolicy.site_delta`` of its ``num_records`` training
        records: the delta its ledger is read at)."""
        if policy is None:
            return None
        return cls(release=policy.release, epsilon=policy.evaluation_epsilon,
                   max_epsilon_per_run=policy.max_evaluation_epsilon_per_run,
                   max_evaluations=policy.max_evaluations_per_run, min_cell_size=policy.min_cell_size,
                   only_known_models=policy.evaluate_only_known_models,
                   send_group_counts=policy.send_group_counts,
                   min_group_size=max(policy.min_group_size, run_min_group_size),
                   delta=float(policy.site_delta(num_records)),
                   epsilon_cap=policy.epsilon_cap)


def refuse(reason: str) -> None:
    raise PolicyRefusal(f"site policy refuses the evaluation: {reason}")


# ------------------------------------------------------------------ the site's memory
class ReleaseState:
    """Models a site received, rounds it trained in, evaluations it answered (SQLite)."""

    _SCHEMA = ("CREATE TABLE IF NOT EXISTS model (run_id TEXT, round INTEGER, sha256 TEXT, at REAL)",
               "CREATE TABLE IF NOT EXISTS trained (run_id TEXT, round INTEGER, at REAL)",
               "CREATE TABLE IF NOT EXISTS evaluation (run_id TEXT, round INTEGER, sha256 TEXT, at REAL)")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for statement in self._SCHEMA:
            self._run(statement)

    @classmethod
    def beside(cls, ledger_or_audit: Path | None, site_id: str) -> "ReleaseState | None":
        return cls(ledger_or_audit.with_name(f"{site_id}.release.sqlite")) if ledger_or_audit else None

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=30.0, isolation_level=None)) as con:
                return con.execute(sql, args).fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise PrivacyError(f"site release state {self.path} cannot be used ({type(exc).__name__})") from None

    def remember_model(self, run_id: str, rnd: int, sha256: str) -> None:
        self._run("INSERT INTO model VALUES (?,?,?,?)", (run_id, int(rnd), sha256, time.time()))

    def remember_trained(self, run_id: str, rnd: int) -> None:
        self._run("INSERT INTO trained VALUES (?,?,?)", (run_id, int(rnd), time.time()))

    def remember_evaluation(self, run_id: str, rnd: int, sha256: str) -> None:
        self._run("INSERT INTO evaluation VALUES (?,?,?,?)", (run_id, int(rnd), sha256, time.time()))

    def evaluations(self, run_id: str) -> int:
        return int(self._run("SELECT COUNT(*) FROM evaluation WHERE run_id=?", (run_id,))[0][0])

    def known(self, run_id: str, sha256: str) -> bool:
        return bool(self._run("SELECT 1 FROM model WHERE run_id=? AND sha256=?", (run_id, sha256)))

    def aggregate_pending(self, run_id: str, rnd: int) -> bool:
        """The site trained in round ``rnd`` and has not yet evaluated a model for it."""
        trained = self._run("SELECT 1 FROM trained WHERE run_id=? AND round=?", (run_id, int(rnd)))
        done = self._run("SELECT 1 FROM evaluation WHERE run_id=? AND round=?", (run_id, int(rnd)))
        return bool(trained) and not done


def admit(rules: Rules, state: ReleaseState | None, run_id: str, rnd: int, sha256: str, n_test: int) -> None:
    """Raise ``PolicyRefusal`` unless the site may answer this evaluation."""
    if rules.release == "none":
        refuse("this site releases no evaluations (release = \"none\")")
    if state is None:
        refuse("the site has no ledger or audit file beside which to keep its release state")
    if rules.max_evaluations and state.evaluations(run_id) >= rules.max_evaluations:
        refuse(f"this run already had max_evaluations_per_run={rules.max_evaluations} evaluations")
    if rules.only_known_models and not (state.known(run_id, sha256) or state.aggregate_pending(run_id, rnd)):
        refuse(f"the model is neither one this site received for training in this run nor the first "
               f"evaluation of round {rnd}'s aggregate after it trained in that round (evaluate_only_known_models)")
    if n_test < max(rules.min_cell_size, 1):
        refuse(f"the test split holds fewer patients than min_cell_size={rules.min_cell_size}")


# ------------------------------------------------------------------ the mechanism
def sensitivity(num_classes: int, num_attributes: int) -> float:
    """L2 sensitivity of all released histograms to replacing one patient's record."""
    return math.sqrt(2 * (1 + len(_scored(num_classes))) * (1 + num_attributes))


@functools.lru_cache(maxsize=256)
def noise_multiplier(epsilon: float, delta: float) -> float:
    """The smallest z (to 1e-3) for which one Gaussian release is (epsilon, delta)-DP."""
    if epsilon <= 0:
        raise PrivacyError(f"evaluation_epsilon must be > 0 for a noised release, got {epsilon}")
    lo, hi = 0.05, 1.0
    while epsilon_of([(hi, 1.0, 1)], delta, ACCOUNTANT) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyError(f"no Gaussian noise gives epsilon {epsilon} at delta {delta}")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon_of([(mid, 1.0, 1)], delta, ACCOUNTANT) > epsilon else (lo, mid)
    return hi


def charge(rules: Rules, ledger, dataset_id: str, run_id: str, rnd: int, z: float) -> float:
    """Check the run's and the lifetime epsilon with this release, then write it to the
    ledger (before anything leaves). Returns the run's evaluation epsilon after it."""
    if ledger is None:
        refuse("a noised release is charged to the site's privacy ledger, and this site has none")
    account = EVALUATION_RUN.format(run_id=run_id)
    event = [(z, 1.0, 1)]
    run_eps = ledger.epsilon(dataset_id, rules.delta, ACCOUNTANT, run_id=account, extra=event)
    if rules.max_epsilon_per_run and run_eps > rules.max_epsilon_per_run * (1 + 1e-6):
        refuse(f"this evaluation would bring the run's evaluation epsilon to {run_eps:.3g}, more than "
               f"max_evaluation_epsilon_per_run={rules.max_epsilon_per_run}")
    if rules.epsilon_cap:
        lifetime = ledger.epsilon(dataset_id, rules.delta, ACCOUNTANT, extra=event)
        if lifetime > rules.epsilon_cap * (1 + 1e-6):
            refuse(f"this evaluation would bring the site's lifetime epsilon to {lifetime:.3g}, more than "
                   f"epsilon_cap={rules.epsilon_cap}")
    ledger.record(dataset_id, account, rnd, z, 1.0, 1, rules.delta, ACCOUNTANT, rules.epsilon_cap)
    return run_eps


def noised_release(scores: np.ndarray, labels: np.ndarray, groups: dict[str, np.ndarray], rules: Rules,
                   z: float, site_id: str, rng: np.random.Generator | None = None) -> tuple[dict, dict]:
    """(metrics with ``num-examples``, fairness counts or None) from noisy counts."""
    from fedcare.schemas import NUM_EXAMPLES

    rng = rng if rng is not None else np.random.default_rng()
    probs = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int).reshape(-1)
    k = probs.shape[1]
    groups = groups or {CLASS_ATTRIBUTE: np.array([f"class {c}" for c in labels])}
    layers = groups if rules.send_group_counts else {}
    sigma = z * sensitivity(k, len(layers))
    overall = _noisy_counts(probs, labels, sigma, rng)
    attributes = {}
    for attribute, values in layers.items():
        values = np.asarray(values).astype(str).reshape(-1)
        names, sizes = np.unique(values, return_counts=True)
        hidden = suppressed_groups(dict(zip(names.tolist(), sizes.tolist())),
                                   max(rules.min_group_size, rules.min_cell_size))
        cells = {name: _cell(*_noisy_counts(probs[values == name], labels[values == name], sigma, rng))
                 for name in names.tolist()}    # every group is noised, so the noise is the same either way
        attributes[str(attribute)] = {name: ({"suppressed": True} if name in hidden else cell)
                                      for name, cell in cells.items()}
    metrics = {NUM_EXAMPLES: max(0, int(overall[0].sum())), **derived_metrics(*overall)}
    fairness = None
    if rules.send_group_counts:
        fairness = {"version": VERSION, "site": site_id, "num_classes": k, "bins": BINS,
                    "min_group_size": max(rules.min_group_size, rules.min_cell_size), "overall": _cell(*overall),
                    "attributes": attributes,
                    "release": {"mechanism": "gaussian", "sigma": sigma, "epsilon": rules.epsilon,
                                "delta": rules.delta}}
    return metrics, fairness


def derived_metrics(confusion: np.ndarray, joints: list[np.ndarray]) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1 and (binary) auroc from noisy counts that
    are rounded but not clipped (clipping at 0 would bias every ratio: most cells of a
    confusion matrix are near 0), each clipped to [0, 1]; {} when the total is not
    positive."""
    total = confusion.sum()
    if total <= 0:
        return {}
    unit = lambda x: float(min(1.0, max(0.0, x)))   # noqa: E731
    diag, rows, cols = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    recall = [unit(d / r) if r > 0 else 0.0 for d, r in zip(diag, rows)]
    f1 = [unit(2 * d / (r + c)) if r + c > 0 else 0.0 for d, r, c in zip(diag, rows, cols)]
    out = {"accuracy": unit(diag.sum() / total), "balanced_accuracy": float(np.mean(recall)),
           "macro_f1": float(np.mean(f1))}
    if len(diag) == 2:
        auroc = histogram_auroc(np.clip(joints[0][1], 0, None), np.clip(joints[0][0], 0, None))
        if auroc is not None:
            out["auroc"] = auroc
    return out


def _scored(num_classes: int) -> list[int]:
    return [1] if num_classes == 2 else list(range(num_classes))


def _noisy_counts(probs: np.ndarray, labels: np.ndarray, sigma: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The noisy (rounded, not clipped) confusion matrix and, per scored class, the joint
    histogram (true or not x score bin) of one cell."""
    k = probs.shape[1]
    noisy = lambda counts: np.rint(counts + rng.normal(0.0, sigma, counts.shape))   # noqa: E731
    confusion = np.zeros((k, k))
    np.add.at(confusion, (labels, probs.argmax(axis=1)), 1)
    joints = []
    for c in _scored(k):
        joint = np.zeros((2, BINS))
        np.add.at(joint, ((labels == c).astype(int), np.clip((probs[:, c] * BINS).astype(int), 0, BINS - 1)), 1)
        joints.append(noisy(joint))
    return noisy(confusion), joints


def _cell(confusion: np.ndarray, joints: list[np.ndarray]) -> dict:
    """One cell in the fairness module's shape (counts clipped at 0, as it requires)."""
    confusion = np.clip(confusion, 0, None).astype(int)
    n = int(confusion.sum())
    classes = []
    for c, joint in zip(_scored(len(confusion)), joints):
        joint = np.clip(joint, 0, None).astype(int)
        tp = int(confusion[c, c])
        fn, fp = int(confusion[c].sum()) - tp, int(confusion[:, c].sum()) - tp
        classes.append({"class": c, "tp": tp, "fp": fp, "tn": n - tp - fn - fp, "fn": fn,
                        "hist_pos": joint[1].tolist(), "hist_neg": joint[0].tolist()})
    return {"n": n, "correct": int(np.trace(confusion)), "classes": classes}
