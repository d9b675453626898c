"""DP-SGD at a site: budget refusal before training, spend recorded before anything can
be sent, clipping, the adapter really trains under DP, and hooks do not leak across rounds."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedcare.client.ledger import SiteLedger, epsilon_of
from fedcare.client.privacy import DPPlan, plan_round, private_round
from fedcare.client.training import train_on_site
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PrivacyError
from fedcare.models.heart_disease import HeartDiseaseTask
from fedcare.models.training import make_optimizer, train_steps

CPU = torch.device("cpu")


def heart_cfg(**flat) -> RunConfig:
    base = {"task": "heart-disease", "rounds": 3, "train.local_steps": 10, "dp.level": "sample",
            "dp.noise_multiplier": 1.0, "dp.delta": 1e-4, "dp.max_grad_norm": 1.1, "dp.accountant": "rdp"}
    return RunConfig.from_flat({**base, **flat}).validate()


@pytest.fixture(scope="module")
def heart():
    task = HeartDiseaseTask()
    return task, task.load_site("switzerland", heart_cfg())   # 30 train examples


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(task, split, cfg, ledger, rnd=1, budget=0.0, model=None, run_id="run-1"):
    model = model if model is not None else task.build_model(cfg)
    out = train_on_site(task, model, split, cfg, CPU, run_id=run_id, server_round=rnd, ledger=ledger,
                        budget=budget, dataset_id="switzerland")
    return model, out


# ------------------------------------------------------------------ ledger and budget
def test_rounds_record_their_spend_and_report_it(heart, tmp_path):
    task, split = heart
    cfg = heart_cfg()
    ledger = SiteLedger(tmp_path / "l.sqlite")
    model = task.build_model(cfg)
    for rnd in (1, 2):
        _, out = _train(task, split, cfg, ledger, rnd, model=model)
    q = cfg.train.batch_size / len(split.train)
    assert ledger.history("switzerland") == [(1.0, q, 10), (1.0, q, 10)]
    p = out.privacy
    assert p["epsilon"] == pytest.approx(epsilon_of([(1.0, q, 20)], 1e-4, "rdp"))
    assert p["run_epsilon"] == p["epsilon"] and p["steps"] == 20 and p["round_steps"] == 10
    assert (p["noise_multiplier"], p["sample_rate"], p["delta"], p["accountant"]) == (1.0, q, 1e-4, "rdp")
    from fedcare.schemas import PRIVACY_KEYS
    assert set(PRIVACY_KEYS) <= set(p)


def test_second_run_on_same_ledger_accumulates(heart, tmp_path):
    task, split = heart
    cfg = heart_cfg()
    path = tmp_path / "l.sqlite"
    _, first = _train(task, split, cfg, SiteLedger(path), run_id="run-1")
    _, second = _train(task, split, cfg, SiteLedger(path), run_id="run-2")
    assert second.privacy["run_epsilon"] == pytest.approx(first.privacy["epsilon"])
    assert second.privacy["epsilon"] > first.privacy["epsilon"] * 1.2
    assert second.privacy["steps"] == 10   # this run's steps


def test_round_past_the_cap_is_refused_before_training(heart, tmp_path):
    task, split = heart
    cfg = heart_cfg()
    ledger = SiteLedger(tmp_path / "l.sqlite")
    model, out = _train(task, split, cfg, ledger, 1)
    spent = out.privacy["epsilon"]
    two_rounds = ledger.epsilon("switzerland", 1e-4, "rdp", extra=[ledger.history("switzerland")[0]])
    budget = (spent + two_rounds) / 2           # round 1 fits, round 2 would not
    before, entries = _params(model), ledger.entries()
    with pytest.raises(PrivacyError, match=r"site budget exceeded: spent .* would reach .* > cap"):
        _train(task, split, cfg, ledger, 2, budget=budget, model=model)
    assert ledger.entries() == entries          # nothing recorded
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())   # nothing trained
    _, ok = _train(task, split, cfg, ledger, 2, budget=two_rounds * 1.01, model=model)
    assert ok.privacy["epsilon"] <= two_rounds * 1.01 and ok.privacy["budget"] == pytest.approx(two_rounds * 1.01)


def test_budget_without_dp_sgd_is_refused(heart, tmp_path):
    task, split = heart
    cfg = RunConfig.from_flat({"task": "heart-disease", "train.local_steps": 2}).validate()
    with pytest.raises(PrivacyError, match="without DP-SGD"):
        _train(task, split, cfg, SiteLedger(tmp_path / "l.sqlite"), budget=5.0)
    _, plain = _train(task, split, cfg, None)   # no cap, no DP: plain training, no privacy record
    assert plain.privacy is None and plain.result.steps == 2


def test_crash_after_training_before_sending_leaves_spend(tmp_path):
    """A separate process trains one DP round and dies hard (os._exit) right after
    train_on_site returns, before any reply could be sent: the spend is on disk."""
    path = tmp_path / "site.ledger.sqlite"
    script = textwrap.dedent(f"""
        import os, torch
        from fedcare.config import RunConfig
        from fedcare.client.ledger import SiteLedger
        from fedcare.client.training import train_on_site
        from fedcare.models.heart_disease import HeartDiseaseTask
        cfg = RunConfig.from_flat({{"task": "heart-disease", "train.local_steps": 5, "dp.noise_multiplier": 1.0,
                                   "dp.delta": 1e-4, "dp.accountant": "rdp"}}).validate()
        task = HeartDiseaseTask(); split = task.load_site("va", cfg)
        out = train_on_site(task, task.build_model(cfg), split, cfg, torch.device("cpu"), run_id="r",
                            server_round=1, ledger=SiteLedger({str(path)!r}), budget=0.0, dataset_id="va")
        os._exit(17)   # the process dies before the update leaves the site
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 17, proc.stderr[-2000:]
    (entry,) = SiteLedger(path).entries("va")
    assert (entry.run_id, entry.round, entry.steps, entry.noise_multiplier) == ("r", 1, 5, 1.0)


class FailingTask(HeartDiseaseTask):
    """Heart disease whose loss raises on its third batch: a crash in the middle of a round."""

    def __init__(self):
        self.calls = 0

    def batch_loss(self, model, batch):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("site crashed mid-round")
        return super().batch_loss(model, batch)


def test_crash_mid_round_records_steps_already_taken(heart, tmp_path):
    _, split = heart
    task, cfg = FailingTask(), heart_cfg(**{"train.batch_size": 30})   # rate 1: no empty batches
    ledger = SiteLedger(tmp_path / "l.sqlite")
    model = task.build_model(cfg)
    with pytest.raises(RuntimeError, match="mid-round"):
        _train(task, split, cfg, ledger, model=model)
    (entry,) = ledger.entries()
    assert entry.steps == 2                     # two noisy steps touched the data
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flat,match", [
    ({"dp.delta": 0.05}, "below 1/N"),                                     # 30 examples: 1/N = 0.033
    ({"dp.noise_multiplier": 0.0, "dp.epsilon": 1e-6}, "impossible"),
])
def test_bad_dp_settings_fail_before_training(heart, tmp_path, flat, match):
    task, split = heart
    cfg = heart_cfg(**flat)
    ledger = SiteLedger(tmp_path / "l.sqlite")
    model = task.build_model(cfg)
    before = _params(model)
    with pytest.raises(PrivacyError, match=match):
        _train(task, split, cfg, ledger, model=model)
    assert ledger.entries() == []
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_clipping_norm_must_be_positive(heart):
    with pytest.raises(ConfigError, match="max_grad_norm"):
        heart_cfg(**{"dp.max_grad_norm": 0.0})
    cfg = heart_cfg()
    cfg.dp.max_grad_norm = -1.0                 # a config that skipped validation
    with pytest.raises(PrivacyError, match="max_grad_norm"):
        plan_round(cfg, len(heart[1].train))


def test_calibrated_noise_meets_the_target_over_the_run(heart, tmp_path):
    task, split = heart
    cfg = heart_cfg(**{"dp.noise_multiplier": 0.0, "dp.epsilon": 2.0, "rounds": 2, "train.local_steps": 15})
    ledger = SiteLedger(tmp_path / "l.sqlite")
    model = task.build_model(cfg)
    for rnd in (1, 2):
        _, out = _train(task, split, cfg, ledger, rnd, model=model)
    assert 1.8 < out.privacy["epsilon"] <= 2.0 + 1e-9


# -------------------------------------------------------------------- the mechanism
def _per_example_clipped_grads(model, task, examples, plan):
    """For each example alone: the DP optimiser's gradient with noise off, times the
    batch size it divides by, is exactly that example's clipped gradient."""
    out = []
    opt = make_optimizer(model, heart_cfg())
    ds = torch.utils.data.TensorDataset(*examples)
    with private_round(model, opt, ds, plan, CPU) as dp:
        for i in range(len(examples[0])):
            dp.optimizer.zero_grad()
            loss = task.batch_loss(model, tuple(t[i:i + 1] for t in examples))
            loss.backward()
            raw = torch.cat([p.grad_sample.reshape(-1) for p in dp.optimizer.params]).norm()
            dp.optimizer.pre_step()
            clipped = torch.cat([p.grad.reshape(-1) for p in dp.optimizer.params]).norm() * plan.expected_batch_size
            out.append((float(raw), float(clipped)))
    return out


def test_per_sample_gradients_are_clipped(heart):
    task, split = heart
    x, y = split.train.tensors
    examples = (x[:8] * 50.0, y[:8])            # large inputs: large per-sample gradients
    plan = DPPlan(noise_multiplier=0.0, sample_rate=0.1, steps=1, max_grad_norm=1.1, delta=1e-4,
                  accountant="rdp", expected_batch_size=4)
    norms = _per_example_clipped_grads(task.build_model(heart_cfg()), task, examples, plan)
    assert max(raw for raw, _ in norms) > 10 * plan.max_grad_norm   # clipping had work to do
    for raw, clipped in norms:
        assert clipped <= plan.max_grad_norm * (1 + 1e-5)
        assert clipped == pytest.approx(min(raw, plan.max_grad_norm), rel=1e-4)


def test_empty_poisson_batches_are_noise_only_steps(heart):
    task, split = heart
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1 / 30, steps=40, max_grad_norm=1.0, delta=1e-4,
                  accountant="rdp", expected_batch_size=1)
    model = task.build_model(heart_cfg())
    with private_round(model, make_optimizer(model, heart_cfg()), split.train, plan, CPU) as dp:
        train_steps(task, model, dp.optimizer, dp.loader, plan.steps, CPU)
        assert dp.loader.empty_batches > 0      # P(no empty batch in 40 draws) ~ 1e-8
        assert dp.steps_taken == 40             # every step, empty or not, is accounted


class StaleCopyTask(HeartDiseaseTask):
    """opacus#820's shape: the forward pass runs on a copy, so the parameters the
    optimiser (and DP) hold never receive a gradient."""

    def build_model(self, cfg):
        model = super().build_model(cfg)
        self.shadow = copy.deepcopy(model)   # e.g. the copy `.to(device)` made after the optimiser
        return model

    def batch_loss(self, model, batch):
        return super().batch_loss(self.shadow, batch)


@pytest.mark.parametrize("dp", [False, True])
def test_parameters_that_do_not_train_fail_the_round_loudly(heart, tmp_path, dp):
    _, split = heart
    task = StaleCopyTask()
    cfg = heart_cfg(**{"train.batch_size": 30}) if dp else RunConfig.from_flat({"task": "heart-disease"}).validate()
    ledger = SiteLedger(tmp_path / "l.sqlite")
    with pytest.raises((RuntimeError, ValueError), match="did not change|Per sample gradient"):
        _train(task, split, cfg, ledger)
    assert ledger.entries() == []


# ------------------------------------------------------------------- the LoRA task
def test_lora_adapter_trains_under_dp_two_rounds_same_model(tmp_path):
    """medical-abstracts, tiny: every LoRA A/B tensor and the head change under DP-SGD,
    in two successive rounds on the one cached model object (hooks removed in between);
    under FFA-LoRA the frozen A stays put and B moves."""
    from fedcare.models.medical_abstracts import MedicalAbstractsTask

    task = MedicalAbstractsTask()
    flat = {**task.settings("lora"), "task": "medical-abstracts", "rounds": 2, "train.local_steps": 2,
            "train.batch_size": 2, "data.max_train_per_site": 12, "data.max_test_per_site": 5,
            "dp.noise_multiplier": 1.0, "dp.delta": 1e-3, "lora.target_modules": "query"}
    for aggregation, rounds in (("naive", (1, 2)), ("ffa", (1,))):
        cfg = RunConfig.from_flat({**flat, "lora.aggregation": aggregation}).validate()
        split = task.load_site("site-0", cfg)
        model = task.build_model(cfg)
        ledger = SiteLedger(tmp_path / f"{aggregation}.sqlite")
        for rnd in rounds:
            before = _params(model)
            out = train_on_site(task, model, split, cfg, CPU, run_id="r", server_round=rnd, ledger=ledger,
                                budget=0.0, dataset_id="site-0")
            moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert moved == trainable, f"{aggregation} round {rnd}: {sorted(trainable - moved)[:3]} did not train"
            assert any("lora_B" in n for n in moved) and any("classifier" in n for n in moved)
            assert any("lora_A" in n for n in moved) == (aggregation == "naive")
            assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        assert out.privacy["steps"] == 2 * len(rounds)
        assert np.isfinite(out.privacy["epsilon"])


# ------------------------------------------------------------------ client-level DP
def _client_dp_round(strategy, global_state, site_states, nums, rnd=1, server_state=None):
    """The round loop's call: ``aggregate`` on the accepted updates -> (new state, Aggregate)."""
    from fedcare.schemas import SiteUpdate
    from fedcare.strategies.aggregate import ServerState, aggregate

    updates = [SiteUpdate(node_id=101 + i, site=f"site-{i}", status="ok", arrays=s, num_examples=n, train_loss=0.5)
               for i, (s, n) in enumerate(zip(site_states, nums))]
    result = aggregate(strategy, updates, global_state, rnd, server_state or ServerState())
    return result.state, result


def _client_dp_strategy(**sets):
    from fedcare.strategies.registry import build_strategy

    cfg = RunConfig.from_flat({"task": "heart-disease", "dp.level": "client", "dp.max_grad_norm": 1.0,
                               "dp.accountant": "rdp", "strategy.min_sites": 1, **sets}).validate()
    return build_strategy(cfg, HeartDiseaseTask()), cfg


def test_client_dp_clips_each_site_and_weights_sites_equally():
    strategy, _ = _client_dp_strategy(**{"dp.noise_multiplier": 1e-9})
    rng = np.random.default_rng(0)
    g = {"weight": rng.normal(size=(1, 13)).astype(np.float32), "bias": np.zeros(1, np.float32)}
    deltas = [{k: rng.normal(scale=s, size=v.shape).astype(np.float32) for k, v in g.items()} for s in (0.01, 3, 5, 9)]
    sites = [{k: g[k] + d[k] for k in g} for d in deltas]
    new, _ = _client_dp_round(strategy, g, sites, nums=[199, 172, 30, 85])

    def clipped(d):
        norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values()))
        return {k: v * min(1.0, 1.0 / norm) for k, v in d.items()}

    expected = {k: g[k] + np.mean([clipped(d)[k] for d in deltas], axis=0) for k in g}
    for k in g:
        np.testing.assert_allclose(new[k], expected[k], atol=1e-5)


def test_client_dp_noise_and_client_epsilon():
    from fedcare.strategies.client_dp import client_level_epsilon

    strategy, cfg = _client_dp_strategy(**{"dp.noise_multiplier": 2.0, "dp.delta": 1e-3})
    g = {"weight": np.zeros((1, 100_000), np.float32), "bias": np.zeros(1, np.float32)}
    server_state = None
    for rnd, m in ((1, 4), (2, 3)):                       # round 2: one site refused
        new, result = _client_dp_round(strategy, g, [g] * m, nums=[10] * m, rnd=rnd, server_state=server_state)
        server_state = result.server_state
        assert np.std(new["weight"]) == pytest.approx(2.0 * 1.0 / m, rel=0.02)   # z C / m
        eps = result.diagnostics["client_epsilon"]
        assert eps == pytest.approx(client_level_epsilon(2.0, rnd, 1.0, 1e-3, "rdp"))
    assert eps > client_level_epsilon(2.0, 1, 1.0, 1e-3, "rdp") > 0


def test_client_dp_calibrates_to_target_over_the_rounds():
    from fedcare.strategies.client_dp import client_level_epsilon, client_noise_multiplier

    cfg = RunConfig.from_flat({"dp.level": "client", "dp.epsilon": 8.0, "dp.delta": 1e-3, "rounds": 15,
                               "dp.accountant": "rdp"}).validate()
    z = client_noise_multiplier(cfg)
    assert 7.5 < client_level_epsilon(z, 15, 1.0, 1e-3, "rdp") <= 8.0


@pytest.mark.parametrize("sets,match", [
    ({"strategy.name": "fedadam"}, "mean of the clipped"),
    ({"strategy.screen_norm_factor": 3.0}, "screening"),
])
def test_client_dp_refuses_rules_its_noise_does_not_cover(sets, match):
    with pytest.raises(ConfigError, match=match):
        _client_dp_strategy(**{"dp.noise_multiplier": 1.0, **sets})
