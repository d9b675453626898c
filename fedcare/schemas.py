"""Shapes that cross a boundary, defined once: message record keys, metric names,
and the records the server writes to the store.

Client, server, store, report and dashboard import these; none re-declares them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --- Flower message record keys -------------------------------------------------
ARRAYS = "arrays"        # ArrayRecord: trainable state (global down, update up)
CONFIG = "config"        # ConfigRecord: server -> site instructions
METRICS = "metrics"      # MetricRecord: site -> server numbers
SITE = "site"            # ConfigRecord: site -> server: site id, status, reason, JSON blobs
EVALUATION = "evaluation"  # ConfigRecord site -> server in a train reply: the incoming global
                           # model's evaluation (strategy.evaluate_with_train), as JSON fields

# --- keys inside METRICS (train and evaluate replies) ---------------------------
NUM_EXAMPLES = "num-examples"   # Flower's default weighting key
TRAIN_LOSS = "train_loss"
DURATION_S = "duration_s"
UPDATE_BYTES = "update_bytes"

# --- keys inside SITE -------------------------------------------------------------
SITE_ID = "site_id"
STATUS = "status"               # ok | refused | error
REASON = "reason"
PRIVACY_JSON = "privacy_json"   # PrivacySpend as JSON (DP runs)
FAIRNESS_JSON = "fairness_json"  # per-group counts as JSON (evaluate replies)
LOCAL_METRICS_JSON = "local_metrics_json"  # personalised (local) model metrics
BENEFIT_JSON = "benefit_json"   # {model: metrics with intervals} on the site's own test split
LORA_RANK = "lora_rank"         # the LoRA rank the site trains at (heterogeneous ranks)
NONCE = "nonce"                 # in CONFIG (server -> site) and echoed in SITE: one per round
AUDIT_JSON = "audit_json"       # privacy-audit record as JSON (last round's evaluate reply)
WORKER = "worker"               # simulation: where the virtual site ran ("host/Ray node id device")
METRICS_JSON = "metrics_json"   # in EVALUATION: what an evaluate reply's METRICS holds, as JSON

# --- keys inside CONFIG (server -> site) ------------------------------------------
EVALUATE_FIRST = "evaluate-first"  # evaluate the incoming global model, then train
SERVER_ROUND = "server-round"      # the round number (Flower's key)

# --- site-round statuses in the store ----------------------------------------------
ACCEPTED = "accepted"    # update aggregated
REJECTED = "rejected"    # update failed validation/screening at the server
REFUSED = "refused"      # the site declined (budget, policy) before training
FAILED = "failed"        # the site errored or did not reply in time

# --- run statuses ------------------------------------------------------------------
RUN_STATUSES = ("pending", "running", "completed", "failed", "interrupted")

# --- privacy record keys (report "privacy" object per site) -------------------------
PRIVACY_KEYS = ("epsilon", "run_epsilon", "delta", "budget", "accountant",
                "noise_multiplier", "sample_rate", "steps")


# --- the benefit of joining (client/personalize.py): one Evaluation per site and model,
# of kind "benefit:<model>", its metrics with <metric>_lo/_hi and (global) prevalence_<k>
BENEFIT = "benefit"
BENEFIT_MODELS = ("global", "personal", "alone")


def benefit_kind(model: str) -> str:
    return f"{BENEFIT}:{model}"


# --- privacy-audit record (client/privacy_audit.py), stored as an Evaluation of kind AUDIT
AUDIT = "audit"
AUDIT_KEYS = ("canaries", "guesses", "correct", "epsilon_lower_bound", "delta", "confidence")


@dataclass
class SiteRound:
    """What the server learned from one site in one round."""

    site: str
    status: str                      # ACCEPTED | REJECTED | REFUSED | FAILED
    reason: str = ""
    node_id: int | None = None
    num_examples: int = 0
    train_loss: float | None = None
    update_bytes: int = 0
    duration_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None   # PRIVACY_KEYS, lifetime and this run

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED


@dataclass
class SiteUpdate:
    """One site's reply to one message, decoded once on arrival (``server/replies.py``);
    screening, aggregation and the store use this, never the raw message.

    ``site`` is the site the authenticated node is (registered or first seen as), not
    what the reply says about itself; ``status`` is "ok" or REFUSED/FAILED/REJECTED."""

    node_id: int
    site: str
    status: str
    reason: str = ""
    num_examples: int = 0
    train_loss: float | None = None
    update_bytes: int = 0
    duration_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    fairness: dict[str, Any] | None = None
    local_metrics: dict[str, float] | None = None
    benefit: dict[str, dict[str, float]] | None = None   # BENEFIT_JSON: model -> numbers
    audit: dict[str, float] | None = None   # privacy-audit record (AUDIT_JSON)
    lora_rank: int | None = None
    worker: str = ""                 # simulation: where the site ran (WORKER), "" if not said
    arrays: dict[str, np.ndarray] | None = None
    message: Any = None              # the Flower reply: only secure aggregation reads it (its own
                                     # record); aggregation (strategies/aggregate.py) uses ``arrays``

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def site_round(self) -> "SiteRound":
        status = ACCEPTED if self.ok else self.status
        return SiteRound(site=self.site, status=status, reason=self.reason, node_id=self.node_id,
                         num_examples=self.num_examples, train_loss=self.train_loss,
                         update_bytes=self.update_bytes, duration_s=self.duration_s,
                         metrics=dict(self.metrics), privacy=self.privacy)


@dataclass
class Evaluation:
    """Metrics on test data: scope is "global" (weighted over sites) or a site id;
    kind is "federated" (the global model) or "local" (a personalised model)."""

    scope: str
    metrics: dict[str, float]
    num_examples: int = 0
    kind: str = "federated"


@dataclass
class RoundRecord:
    """Everything the server writes for one round, in one transaction."""

    round: int
    started_at: float                # unix seconds
    ended_at: float
    metrics: dict[str, float]        # aggregated train metrics (and aggregation diagnostics)
    sites: list[SiteRound]
    evaluations: list[Evaluation]
    global_state: dict[str, np.ndarray] | None
    fairness: dict[str, Any] | None = None
