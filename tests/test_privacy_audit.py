"""The one-run privacy audit (client/privacy_audit.py): the epsilon lower bound itself,
the guesses, the canaries, the planted bugs, and the audit catching them on the real
Opacus path (heart-disease, in process)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from fedcare.client.privacy import DPPlan, private_round
from fedcare.client.privacy_audit import (
    Canaries, audit_in_process, epsilon_lower_bound, p_value, plant_bug, score_guesses, site_canary_count)
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PrivacyError
from fedcare.launch import resolve_config
from fedcare.models.heart_disease import NUM_FEATURES, HeartDiseaseTask


# ---------------------------------------------------------------------- the bound
def _reference_p_value(m, r, v, eps, delta):
    """Steinke, Nasr, Jagielski (2023), Algorithm in their appendix, loop for loop."""
    q = 1 / (1 + math.exp(-eps))
    beta = binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


def test_perfect_guesses_give_the_closed_form_bound():
    # delta = 0: P[Binomial(r, q) >= r] = q^r = 0.05  =>  eps = log(q / (1 - q))
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(5.8, abs=0.02)


def test_chance_level_guesses_give_zero():
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 1000, 520, 1e-5) == 0.0     # within the noise of a fair coin
    assert epsilon_lower_bound(100, 100, 0, 0.0) == 0.0


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta_and_confidence():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in (120, 150, 180, 200)]
    assert all(a < b for a, b in zip(bounds, bounds[1:])) and bounds[0] > 0
    assert epsilon_lower_bound(1000, 200, 190, 1e-3) < epsilon_lower_bound(1000, 200, 190, 0.0)
    assert epsilon_lower_bound(1000, 200, 190, 1e-5, 0.99) < epsilon_lower_bound(1000, 200, 190, 1e-5, 0.95)


@pytest.mark.parametrize("m,r,v,eps,delta", [(1000, 100, 90, 1.0, 1e-5), (50, 50, 40, 0.5, 1e-3),
                                             (13, 13, 12, 0.3, 0.0), (500, 300, 200, 2.0, 1e-4)])
def test_p_value_matches_the_papers_algorithm(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_reference_p_value(m, r, v, eps, delta), rel=1e-9)


def test_the_bound_is_the_largest_rejected_epsilon():
    eps = epsilon_lower_bound(400, 100, 85, 1e-5)
    assert _reference_p_value(400, 100, 85, eps, 1e-5) < 0.05 <= _reference_p_value(400, 100, 85, eps + 1e-3, 1e-5)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)


# ---------------------------------------------------------------------- guesses
def test_guesses_take_the_top_as_in_and_the_bottom_as_out():
    scores = np.array([5.0, -3.0, 4.0, -2.0, 0.1, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert score_guesses(scores, included, 4) == (4, 4)          # 5, 4 in; -3, -2 out
    assert score_guesses(scores, included, 0) == (6, 4)          # all: 5, 4, 0.1 in; -3, -2, 0 out
    assert score_guesses(-scores, included, 4) == (4, 0)


def test_tied_scores_are_no_better_than_chance():
    rng = np.random.default_rng(1)
    included = rng.random(2000) < 0.5
    r, v = score_guesses(np.zeros(2000), np.sort(included), 0)   # sorted: order would leak the secret
    assert epsilon_lower_bound(2000, r, v, 0.0) == 0.0


# ---------------------------------------------------------------------- canaries
def test_heart_canaries_are_synthetic_one_per_axis_and_join_only_when_included():
    task = HeartDiseaseTask()
    cfg = RunConfig.from_flat({"task": "heart-disease"})
    split = task.load_site("cleveland", cfg)
    c = Canaries.generate(task, 13, seed=7, train=split.train)
    x, y = c.data.tensors
    assert ((x != 0).sum(1) == 1).all() and len(set((x != 0).nonzero()[:, 1].tolist())) == NUM_FEATURES
    assert set(y.tolist()) <= {0.0, 1.0}
    joined = c.join(split)
    assert len(joined.train) == len(split.train) + int(c.included.sum())
    assert torch.equal(joined.train[len(split.train)][0], x[np.flatnonzero(c.included)[0]])
    again = Canaries.generate(task, 13, seed=7, train=split.train)
    assert np.array_equal(again.included, c.included)            # same secret seed, same canaries
    with pytest.raises(ConfigError, match="at most 13"):
        task.canaries(14, np.random.default_rng(0), split.train)


def test_deployment_sites_opt_in_themselves_and_refuse_the_planted_bug():
    cfg = RunConfig.from_flat({"audit.canaries": 50, "audit.sites": "hungary"})
    assert site_canary_count(cfg, {"partition-id": 0}, "cleveland") == 0
    assert site_canary_count(cfg, {"partition-id": 1}, "hungary") == 50
    assert site_canary_count(cfg, {"site-id": "hungary"}, "hungary") == 0       # the run cannot ask
    assert site_canary_count(cfg, {"site-id": "x", "audit-canaries": 8}, "x") == 8
    cfg.audit.planted_bug = "no_noise"
    with pytest.raises(PrivacyError, match="simulation tests only"):
        site_canary_count(cfg, {"site-id": "x"}, "x")
    with pytest.raises(ConfigError):
        RunConfig.from_flat({"audit.planted_bug": "no_privacy"}).validate()


# ---------------------------------------------------------------------- planted bugs
def _one_dp_step(bug: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)   # the clipping norm is then the weight's alone
    x = torch.tensor([[100.0, 0, 0], [0, 0.1, 0]])
    y = torch.tensor([1.0, 0.0])
    ds = torch.utils.data.TensorDataset(x, y)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1.0, steps=1, max_grad_norm=1.0, delta=1e-5,
                  accountant="rdp", expected_batch_size=2, planted_bug=bug)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with private_round(model, optimizer, ds, plan, torch.device("cpu")) as dp:
        dp.optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        loss.backward()
        dp.optimizer.pre_step()
        grad = model.weight.grad.clone()
        steps = dp.steps_taken
    per_sample = [torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(
        model(x[i:i + 1]).squeeze(-1), y[i:i + 1]), model.weight)[0] for i in range(2)]
    return grad, per_sample, steps


def test_no_noise_bug_leaves_exactly_the_clipped_mean_and_the_accountant_counting():
    grad, per_sample, steps = _one_dp_step("no_noise")
    clipped = sum(g * min(1.0, 1.0 / (float(g.norm()) + 1e-6)) for g in per_sample) / 2
    assert torch.allclose(grad, clipped, atol=1e-5)
    assert steps == 1


def test_no_clip_bug_leaves_the_large_gradient_unclipped_under_noise():
    grad, per_sample, _ = _one_dp_step("no_clip")
    raw = sum(per_sample) / 2
    assert float(raw.norm()) > 3                                   # far above the clipping norm 1
    assert float((grad - raw).norm()) < float(raw.norm())         # the signal survives the noise
    honest, _, _ = _one_dp_step("")
    assert float((honest - raw).norm()) > float((grad - raw).norm())


def test_unknown_bug_is_a_config_error():
    with pytest.raises(ConfigError):
        plant_bug(object(), "no_accounting")


# ---------------------------------------------------------- the audit catches the bug
AUDIT_SETS = ["rounds=3", "train.local_steps=50", "train.batch_size=16", "train.optimizer=sgd",
              "train.lr=0.05", "dp.delta=1e-3", "audit.canaries=13", "audit.sites=cleveland"]


def _audit(tmp_path, *sets):
    cfg = resolve_config("heart-disease", AUDIT_SETS + list(sets))
    return audit_in_process(cfg, str(tmp_path), sites=["cleveland"], repeats=4)["cleveland"]


def test_planted_no_clip_bug_is_caught_dp_off_is_visible_and_honest_dp_passes(tmp_path):
    buggy = _audit(tmp_path / "bug", "dp.epsilon=1", "audit.planted_bug=no_clip")
    assert buggy["accountant_epsilon"] == pytest.approx(1.0, abs=0.05)    # the accountant is unaware
    assert buggy["canaries"] == 52
    assert buggy["epsilon_lower_bound"] > buggy["accountant_epsilon"]     # the audit is not

    no_dp = _audit(tmp_path / "nodp")
    assert no_dp["accountant_epsilon"] is None
    assert no_dp["epsilon_lower_bound"] > 0.5

    honest = _audit(tmp_path / "honest", "dp.epsilon=1")
    assert honest["epsilon_lower_bound"] < honest["accountant_epsilon"]
