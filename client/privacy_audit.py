"""An empirical check of a site's DP guarantee from the run itself (Steinke, Nasr and
Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023).

The site generates ``m`` canaries (synthetic examples from the task, never patient
records) and includes each in its training split with probability 1/2, by a secret
seed that never leaves the site. The run trains as any other run. At the end the site
scores every canary with the global model it received (the model's log-probability
of the canary's label: trained-on canaries fit better), guesses "in" for the ``r/2``
highest scores and "out" for the ``r/2`` lowest, and counts the correct guesses ``v``.
If training were (epsilon, delta)-DP, ``v`` could not be that high except with
probability 5%; the largest epsilon so rejected is a *lower bound* on the true epsilon.
A bound above the accountant's epsilon means the training does not do what the
accountant assumes (a privacy bug). Only (m, r, v, the bound, delta) leave the site.

``planted_bug`` (simulation only) breaks DP-SGD on purpose, with the accountant
unaware, so that a test can show the audit catches it.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PrivacyError
from fedcare.models.base import SiteSplit, Task
from fedcare.models.registry import get_task
from fedcare.models.training import predict_dataset

PLANTED_BUGS = ("", "no_noise", "no_clip")
STATE_KEY = "privacy-audit"     # the site's Flower context.state record holding the secret seed


# ------------------------------------------------------------------- the bound
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of >= v correct guesses out of r (m canaries) if the training were
    (eps, delta)-DP (Steinke et al. 2023, Theorem 3.1 with its delta term)."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m} r={r} v={v}")
    q = 1.0 / (1.0 + math.exp(-eps))          # accuracy of eps-DP randomised response
    beta = float(binom.sf(v - 1, r, q))         # P[Binomial(r, q) >= v]
    if delta <= 0 or v == 0:
        return min(beta, 1.0)
    below = np.cumsum(binom.pmf(v - np.arange(1, v + 1), r, q))   # P[v > B >= v - i], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` reject at the given
    confidence (0 when the guesses are no better than chance)."""
    p = 1.0 - confidence
    if not 0 < p < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditResult:
    """What leaves the site (fedcare.schemas.AUDIT_KEYS)."""

    canaries: int                # m
    guesses: int                 # r
    correct: int                 # v
    epsilon_lower_bound: float
    delta: float
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def score_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> tuple[int, int]:
    """(r, v): guess "in" for the r/2 highest scores and "out" for the r/2 lowest
    (r = guesses, 0 = all canaries); v counts the right ones. Ties are broken at random
    so that equal scores cannot look like knowledge."""
    m = len(scores)
    r = m if guesses <= 0 else min(guesses, m)
    order = np.lexsort((np.random.default_rng(0).random(m), scores))   # ascending score
    n_in = (r + 1) // 2
    n_out = r - n_in
    guessed_in, guessed_out = order[m - n_in:], order[:n_out]
    v = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return r, v


# ------------------------------------------------------------------- canaries
@dataclass
class Canaries:
    data: Dataset               # all m canaries
    included: np.ndarray        # bool [m]: the secret

    @classmethod
    def generate(cls, task: Task, m: int, seed: int, train: Dataset) -> "Canaries":
        rng = np.random.default_rng(seed)
        data = task.canaries(m, rng, train)
        if len(data) != m:
            raise RuntimeError(f"task {task.name} made {len(data)} canaries, asked for {m}")
        return cls(data, rng.random(m) < 0.5)

    def join(self, split: SiteSplit) -> SiteSplit:
        """The site's split with the included canaries added to its training data."""
        inside = Subset(self.data, np.flatnonzero(self.included).tolist())
        return SiteSplit(split.site_id, ConcatDataset([split.train, inside]), split.test, split.groups)

    def scores(self, task: Task, model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> np.ndarray:
        """Black-box membership score of every canary: the model's log-probability of
        its label (higher = more likely trained on)."""
        probs, labels = predict_dataset(task, model, self.data, cfg, device)
        return np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))

    def audit(self, task: Task, model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> AuditResult:
        """Score every canary with ``model`` and turn the guesses into the bound."""
        return audit_scores(self.scores(task, model, cfg, device), self.included, cfg)


def audit_scores(scores: np.ndarray, included: np.ndarray, cfg: RunConfig) -> AuditResult:
    r, v = score_guesses(scores, included, cfg.audit.guesses)
    eps = epsilon_lower_bound(len(scores), r, v, cfg.dp.delta, cfg.audit.confidence)
    return AuditResult(len(scores), r, v, eps, cfg.dp.delta, cfg.audit.confidence)


# --------------------------------------------------------------- the planted bug
def plant_bug(dp_optimizer, bug: str) -> None:
    """Break the Opacus optimiser the way real bugs do, leaving the accountant (and so
    the reported epsilon) untouched: ``no_noise`` adds no noise; ``no_clip`` sums the
    per-sample gradients without clipping them."""
    if bug == "no_noise":
        dp_optimizer.add_noise = lambda: _noise_free(dp_optimizer)
    elif bug == "no_clip":
        dp_optimizer.clip_and_accumulate = lambda: _unclipped(dp_optimizer)
    elif bug:
        raise ConfigError(f"audit.planted_bug must be one of {', '.join(b for b in PLANTED_BUGS if b)}, got {bug!r}")


def _noise_free(opt) -> None:
    for p in opt.params:
        p.grad = p.summed_grad.view_as(p).to(p.dtype)


def _unclipped(opt) -> None:
    for p in opt.params:
        grad = opt._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad


# -------------------------------------------------------- a site in a Flower run
def site_canary_count(cfg: RunConfig, node_config: dict, site_id: str) -> int:
    """How many canaries this site audits with: in deployment only the site decides
    (node config ``audit-canaries``); in simulation ``audit.canaries`` at the sites in
    ``audit.sites`` ("" = every site)."""
    if "site-id" in node_config:
        if cfg.audit.planted_bug:
            raise PrivacyError("audit.planted_bug breaks DP-SGD on purpose and is for simulation tests only; "
                               "this site refuses it")
        return int(node_config.get("audit-canaries", 0) or 0)
    wanted = [s.strip() for s in cfg.audit.sites.split(",") if s.strip()]
    return cfg.audit.canaries if not wanted or site_id in wanted else 0


def site_canaries(site, context, split: SiteSplit, create: bool) -> Canaries | None:
    """This site's canaries for the run, or None when it does not audit. The secret
    seed is drawn from the OS on the site's first training round and kept in the node's
    Flower context state (never in a message)."""
    m = site_canary_count(site.cfg, site.node_config, site.site_id)
    if m <= 0:
        return None
    from flwr.app import ConfigRecord

    rec = context.state.get(STATE_KEY)
    if rec is None:
        if not create:
            return None
        rec = ConfigRecord({"seed": secrets.randbits(62), "canaries": m})
        context.state[STATE_KEY] = rec
    return Canaries.generate(site.task, int(rec["canaries"]), int(rec["seed"]), split.train)


def audit_final_round(site, context, split: SiteSplit, model, server_round: int) -> dict | None:
    """The audit record for the evaluate reply of the run's last round (None before it,
    or at a site that does not audit or never trained)."""
    if server_round != site.cfg.rounds:
        return None
    canaries = site_canaries(site, context, split, create=False)
    if canaries is None:
        return None
    return canaries.audit(site.task, model, site.cfg, site.device).to_dict()


# ------------------------------------------------- the same audit, in one process
def audit_in_process(cfg: RunConfig, ledger_dir: str, sites: list[str] | None = None,
                     repeats: int = 1) -> dict[str, dict]:
    """``cfg.rounds`` rounds of FedAvg over the task's sites (or ``sites``) in this
    process (the real site training: DP-SGD with Opacus and the ledger; no Flower),
    with the canaries of ``cfg.audit``; per audited site, the accountant's epsilon for
    one run (None without DP) next to the audit's record. For tests and benchmarks;
    the Flower path is ``fedcare audit``.

    ``repeats`` > 1 trains that many independent runs, each with fresh canaries, and
    audits their canaries together: each canary touches one run only, so the runs
    together are as private towards it as one run (parallel composition) and the bound
    still holds for one run's epsilon, with ``repeats`` times the canaries (a small
    model that can hold only a few canaries per run gets a usable m this way)."""
    task = get_task(cfg.task)
    sites = sites or task.site_ids(cfg)
    scores: dict[str, list] = {}
    included: dict[str, list] = {}
    epsilon: dict[str, float | None] = {}
    for k in range(repeats):
        run = _one_run(task, cfg, Path(ledger_dir) / f"run-{k}", sites)
        for s, (sc, inc, eps) in run.items():
            scores.setdefault(s, []).append(sc)
            included.setdefault(s, []).append(inc)
            epsilon[s] = eps
    return {s: {"accountant_epsilon": epsilon[s],
                **audit_scores(np.concatenate(scores[s]), np.concatenate(included[s]), cfg).to_dict()}
            for s in scores}


def _one_run(task: Task, cfg: RunConfig, ledger_dir: Path, sites: list[str]) -> dict[str, tuple]:
    """(canary scores, inclusion, accountant's run epsilon) per audited site after one run."""
    from fedcare.models.state import get_trainable_state, set_trainable_state

    from .ledger import SiteLedger, ledger_path_for
    from .training import train_on_site

    device = torch.device("cpu")
    splits = {s: task.load_site(s, cfg) for s in sites}
    canaries = {s: Canaries.generate(task, m, secrets.randbits(62), splits[s].train) for s in sites
                if (m := site_canary_count(cfg, {}, s)) > 0}
    splits.update({s: c.join(splits[s]) for s, c in canaries.items()})
    model = task.build_model(cfg).to(device)
    state = get_trainable_state(model)
    epsilon: dict[str, float | None] = {}
    for rnd in range(1, cfg.rounds + 1):
        updates, weights = [], []
        for s in sites:
            set_trainable_state(model, state)
            out = train_on_site(task, model, splits[s], cfg, device, run_id="audit", server_round=rnd,
                                ledger=SiteLedger(ledger_path_for(str(ledger_dir), s)), budget=0.0, dataset_id=s)
            updates.append(get_trainable_state(model))
            weights.append(out.result.num_examples)
            epsilon[s] = out.privacy["run_epsilon"] if out.privacy else None
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        state = {k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, updates)).astype(np.float32) for k in state}
    set_trainable_state(model, state)
    return {s: (c.scores(task, model, cfg, device), c.included, epsilon[s]) for s, c in canaries.items()}
