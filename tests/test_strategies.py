"""Strategies by name, LoRA-aware aggregation, client-level DP and robustness.

The rules are numpy functions of decoded states (strategies/aggregate.py); Flower's own
strategy objects (``flwr.serverapp.strategy``) are the reference: fed real
``flwr.app.Message`` replies built the way a ServerApp receives them, they must give the
same numbers to 1e-6 on the same inputs, for every rule, LoRA mode and client-level DP.
The only stand-in is ``NodesGrid``: Flower's strategies use a Grid in
``configure_train`` just to list node ids, and a real SuperLink is not needed for that."""
from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    QFedAvg,
)
from flwr.supercore.task_identity import TaskIdentity

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.base import Task
from fedcare.models.registry import get_task
from fedcare.records import from_array_record, to_array_record
from fedcare.schemas import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE, SITE_ID, TRAIN_LOSS, SiteUpdate
from fedcare.strategies.aggregate import ServerState, aggregate, aggregate_mean
from fedcare.strategies.client_dp import restore_releases
from fedcare.strategies.hetero import pad_to_rank, per_site_arrays
from fedcare.strategies.lora import (
    effective_deltas,
    exact_aggregate,
    from_product_space,
    lora_rank,
    to_product_space,
)
from fedcare.strategies.registry import build_strategy, strategy_names
from fedcare.strategies.rules import weighted_mean

A0 = "base_model.model.layer.0.query.lora_A.default.weight"
B0 = "base_model.model.layer.0.query.lora_B.default.weight"
A1 = "base_model.model.layer.1.value.lora_A.default.weight"
B1 = "base_model.model.layer.1.value.lora_B.default.weight"
HEAD = "base_model.model.classifier.weight"
RULES = ["fedavg", "fedprox", "fedadam", "fedyogi", "qfedavg", "fedmedian", "trimmedavg", "krum"]


class NodesGrid(Grid):
    """Lists a fixed set of node ids; nothing is sent through it in these tests."""

    def __init__(self, node_ids):
        self._ids = list(node_ids)

    def get_node_ids(self):
        return list(self._ids)

    def _unused(self, *a, **k):
        raise NotImplementedError("strategy tests never send through the grid")

    set_run = run = create_message = push_messages = pull_messages = send_and_receive = _unused


class LoraTaskContract(Task):
    """A task declaring a LoRA model: build_strategy reads only these class attributes."""

    name = "lora-contract"
    num_classes = 5
    uses_lora = True

    def load_site(self, site_id, cfg):
        raise NotImplementedError

    def build_model(self, cfg):
        raise NotImplementedError

    def batch_loss(self, model, batch):
        raise NotImplementedError

    def predict(self, model, batch):
        raise NotImplementedError


class FullTaskContract(LoraTaskContract):
    """A task whose model trains all parameters (no LoRA), with any number of sites."""

    name = "full-contract"
    uses_lora = False


@pytest.fixture(autouse=True)
def serverapp_identity():
    """A ServerApp process has its TaskIdentity set before it builds messages."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def cfg_for(name="fedavg", sites=5, **sets):
    cfg = RunConfig()
    cfg.sites = sites
    cfg.strategy.name = name
    cfg.update(sets)
    return cfg


def updates_of(site_states, nums=None, losses=None):
    """The round loop's accepted updates: arrays decoded once, counts and losses typed."""
    n = len(site_states)
    return [SiteUpdate(node_id=101 + i, site=f"site-{i}", status="ok", arrays=s,
                       num_examples=(nums or [50] * n)[i], train_loss=(losses or [0.5] * n)[i])
            for i, s in enumerate(site_states)]


def run_round(strategy, global_state, site_states, nums=None, losses=None, rnd=1, server_state=ServerState()):
    """What the round loop calls: ``aggregate`` on the round's accepted updates."""
    return aggregate(strategy, updates_of(site_states, nums, losses), global_state, rnd, server_state)


# ------------------------------------------------------------ Flower, the reference
def flower_rule(cfg):
    """Flower's strategy object for ``cfg`` (what fedcare aggregated with before)."""
    n = cfg.strategy.min_sites
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                  min_available_nodes=n, weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS,
                  configrecord_key=CONFIG)
    s = cfg.strategy
    return {"fedavg": lambda: FedAvg(**common),
            "fedprox": lambda: FedProx(**common, proximal_mu=s.proximal_mu),
            "fedadam": lambda: FedAdam(**common, eta=s.eta, eta_l=cfg.train.lr, tau=s.tau),
            "fedyogi": lambda: FedYogi(**common, eta=s.eta, eta_l=cfg.train.lr, tau=s.tau),
            "qfedavg": lambda: QFedAvg(client_learning_rate=cfg.train.lr, q=s.q, train_loss_key=TRAIN_LOSS, **common),
            "fedmedian": lambda: FedMedian(**common),
            "trimmedavg": lambda: FedTrimmedAvg(**common, beta=s.trim_beta),
            "krum": lambda: Krum(**common, num_malicious_nodes=s.krum_f)}[s.name]()


def flower_round(flower, global_state, site_states, nums, losses, rnd=1):
    """configure_train -> replies as a ServerApp receives them -> aggregate_train."""
    grid = NodesGrid(range(101, 101 + len(site_states)))
    instructions = sorted(flower.configure_train(rnd, to_array_record(global_state), ConfigRecord(), grid),
                          key=lambda m: m.metadata.dst_node_id)
    assert len(instructions) == len(site_states)
    replies = [Message(RecordDict({ARRAYS: to_array_record(state),
                                   METRICS: MetricRecord({NUM_EXAMPLES: n, TRAIN_LOSS: loss}),
                                   SITE: ConfigRecord({SITE_ID: f"site-{i}"})}), reply_to=ins)
               for i, (ins, state, n, loss) in enumerate(zip(instructions, site_states, nums, losses))]
    gc.freeze()   # Flower's QFedAvg runs gc.collect() per reply: over this process's heap, ~0.1 s each
    try:
        arrays, metrics = flower.aggregate_train(rnd, replies)
    finally:
        gc.unfreeze()
    return dict(from_array_record(arrays)), metrics


def flower_lora_round(flower, mode, global_state, site_states, nums, losses, rnd=1, r=8, alpha=16):
    """Flower's rule in the space the LoRA mode asks (exact: products, re-factorised by
    SVD after; naive: factors padded to the global rank; ffa: B as sent)."""
    scale = (lambda rank: alpha / rank) if mode != "full" else None
    if mode == "exact":
        g_space = to_product_space(global_state, scale)
        agg, metrics = flower_round(flower, g_space, [to_product_space(s, scale) for s in site_states],
                                    nums, losses, rnd)
        return from_product_space(agg, global_state, r, scale).state, metrics
    padded = [pad_to_rank(s, r, scale) if mode != "full" else s for s in site_states]
    agg, metrics = flower_round(flower, global_state, [{k: s[k] for k in global_state} for s in padded],
                                nums, losses, rnd)
    return {k: agg[k].astype(v.dtype) for k, v in global_state.items()}, metrics


def lora_global(rng, r=8, d=16, out=12):
    return {A0: rng.normal(size=(r, d)).astype(np.float32) * 0.1,
            B0: np.zeros((out, r), np.float32),
            A1: rng.normal(size=(r, d)).astype(np.float32) * 0.1,
            B1: np.zeros((out, r), np.float32),
            HEAD: rng.normal(size=(5, out)).astype(np.float32)}


def lora_update(rng, g, r=None):
    s = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
    if r is not None:
        for a, b in ((A0, B0), (A1, B1)):
            s[a], s[b] = s[a][:r].copy(), s[b][:, :r].copy()
    return s


MODES = {   # LoRA mode -> (config, global state, site ranks)
    "full": ({}, None, None),
    "naive": ({"lora.aggregation": "naive"}, "lora", None),
    "ffa": ({"lora.aggregation": "ffa"}, "lora_b", None),
    "exact": ({"lora.aggregation": "exact"}, "lora", None),
    "hetero-naive": ({"lora.aggregation": "naive"}, "lora", [2, 4, 8, 8, 4]),
    "hetero-exact": ({"lora.aggregation": "exact"}, "lora", [2, 4, 8, 8, 4]),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", RULES)
def test_every_rule_and_lora_mode_equals_flowers_strategy(name, mode):
    """Two rounds (FedAdam's and FedYogi's moments carry over) of every rule in every
    LoRA mode give Flower's numbers on the same inputs, to 1e-6, and the same train loss."""
    sets, kind, ranks = MODES[mode]
    rng = np.random.default_rng(sum(map(ord, name + mode)))
    cfg = cfg_for(name, sites=5, **{"lora.r": 8, "lora.alpha": 16, "strategy.krum_f": 1, "strategy.trim_beta": 0.2,
                                    "strategy.eta": 0.2, "strategy.tau": 0.05, "strategy.q": 0.5, "train.lr": 0.1,
                                    **sets})
    if kind is None:
        g = {"w": rng.normal(size=(6, 13)).astype(np.float32), "b": np.zeros(6, np.float32)}
    else:
        g = lora_global(rng)
        g[B0], g[B1] = 0.1 * rng.normal(size=g[B0].shape).astype(np.float32), g[B1]
        if kind == "lora_b":
            g = {k: v for k, v in g.items() if ".lora_A." not in k}
    strategy = build_strategy(cfg, FullTaskContract() if kind is None else LoraTaskContract())
    flower, server_state = flower_rule(cfg), ServerState()
    for rnd in (1, 2):
        sent = [per_site_arrays(strategy.lora, g, r) for r in ranks] if ranks else [g] * 5
        sites = [lora_update(rng, s) for s in sent]
        nums, losses = [30, 50, 10, 80, 20], [0.4, 0.9, 0.2, 0.6, 1.3]
        ours = run_round(strategy, g, sites, nums, losses, rnd, server_state)
        want, metrics = flower_lora_round(flower, "full" if kind is None else mode.split("-")[-1], g,
                                          sites, nums, losses, rnd)
        assert list(ours.state) == list(g)
        for k in g:
            assert ours.state[k].dtype == g[k].dtype and ours.state[k].shape == g[k].shape
            np.testing.assert_allclose(ours.state[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"round {rnd} {k}")
        assert ours.train_loss == pytest.approx(metrics[TRAIN_LOSS], rel=1e-12)
        g, server_state = ours.state, ours.server_state


@pytest.mark.parametrize("mode", ["full", "naive", "ffa"])
def test_client_level_dp_equals_flowers_fixed_clipping_wrapper(mode):
    """Clip each update, FedAvg with equal weights, noise: Flower's server-side
    fixed-clipping wrapper on the same inputs (noise negligible on both sides: a
    multiplier of 1e-9), sites clipped and unclipped, one unchanged (norm 0)."""
    rng = np.random.default_rng(11)
    sets = {} if mode == "full" else {"lora.aggregation": mode}
    cfg = cfg_for("fedavg", sites=4, **{"dp.level": "client", "dp.noise_multiplier": 1e-9,
                                        "dp.max_grad_norm": 1.0, **sets})
    lora = mode != "full"
    g = lora_global(rng) if lora else {"w": rng.normal(size=(6, 13)).astype(np.float32), "b": np.zeros(6, np.float32)}
    if mode == "ffa":
        g = {k: v for k, v in g.items() if ".lora_A." not in k}
    strategy = build_strategy(cfg, LoraTaskContract() if lora else FullTaskContract())
    sites = [{k: (v + s * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
             for s in (0.001, 0.3, 2.0)] + [dict(g)]
    ours = run_round(strategy, g, sites, nums=[199, 172, 30, 85], losses=[0.1, 0.2, 0.3, 0.8], rnd=1)
    flower = DifferentialPrivacyServerSideFixedClipping(flower_rule(cfg), 1e-9, 1.0, 4)
    first = next(iter(g))   # Flower's clipping divides by the norm: the unchanged site moves by 1e-12 (or an ulp)
    unchanged = dict(g, **{first: g[first].copy()})
    x = unchanged[first].reshape(-1)
    x[0] += max(float(np.spacing(np.abs(x[0]))), 1e-12)
    want, metrics = flower_round(flower, g, sites[:3] + [unchanged], [1, 1, 1, 1], [0.1, 0.2, 0.3, 0.8])
    for k in g:
        np.testing.assert_allclose(ours.state[k], want[k], rtol=1e-6, atol=1e-6)
    assert ours.train_loss == pytest.approx(metrics[TRAIN_LOSS]) == pytest.approx(0.35)   # equal weights
    assert ours.server_state.releases == 1 and ours.diagnostics["client_epsilon"] > 0
    assert ours.diagnostics["client_noise_std"] == pytest.approx(1e-9 * 1.0 / 4)


def test_client_level_dp_releases_count_across_rounds_and_resume():
    rng = np.random.default_rng(12)
    cfg = cfg_for("fedavg", sites=3, **{"dp.level": "client", "dp.noise_multiplier": 2.0, "dp.delta": 1e-3,
                                        "dp.accountant": "rdp"})
    strategy = build_strategy(cfg, FullTaskContract())
    g = {"w": np.zeros((2, 3), np.float32)}
    state, eps = ServerState(), []
    for rnd in (1, 2):
        res = run_round(strategy, g, [{"w": rng.normal(size=(2, 3)).astype(np.float32)} for _ in range(3)],
                        rnd=rnd, server_state=state)
        state = res.server_state
        eps.append(res.diagnostics["client_epsilon"])
    assert state.releases == 2 and eps[1] > eps[0] == strategy.client_dp.epsilon(1)
    resumed = restore_releases(ServerState(), [{"metrics": {"client_epsilon": e}} for e in eps] + [{"metrics": {}}])
    assert resumed.releases == 2


def test_aggregating_a_weighted_mean_equals_aggregating_the_updates():
    """Secure aggregation's entry: a rule whose combine is the weighted mean, given the
    mean (a secure sum over the total weight), gives what ``aggregate`` gives."""
    rng = np.random.default_rng(13)
    g = {"w": rng.normal(size=(6, 13)).astype(np.float32), "b": np.zeros(6, np.float32)}
    sites = [lora_update(rng, g) for _ in range(4)]
    nums = [3, 9, 1, 7]
    for name in ("fedavg", "fedprox", "fedadam", "fedyogi"):
        strategy = build_strategy(cfg_for(name, sites=4), FullTaskContract())
        assert strategy.rule.is_weighted_mean
        direct = run_round(strategy, g, sites, nums, rnd=3)
        total = sum(nums)
        secure_sum = {k: sum(n * s[k].astype(np.float64) for n, s in zip(nums, sites)) for k in g}
        via_mean = aggregate_mean(strategy, {k: v / total for k, v in secure_sum.items()}, g, 3, ServerState())
        for k in g:
            np.testing.assert_allclose(via_mean.state[k], direct.state[k], rtol=1e-5, atol=1e-6)
    assert not any(build_strategy(cfg_for(n), FullTaskContract()).rule.is_weighted_mean
                   for n in ("qfedavg", "fedmedian", "trimmedavg", "krum"))


# ------------------------------------------------------------------------ registry
def test_names_and_unknown_name():
    assert strategy_names() == RULES
    with pytest.raises(ConfigError, match="fedavg, fedprox, fedadam"):
        build_strategy(cfg_for("fedsgdx"), get_task("heart-disease"))


@pytest.mark.parametrize("name", RULES)
def test_every_strategy_runs_a_round_on_heart_disease_shapes(name):
    cfg = cfg_for(name, sites=4, **{"strategy.min_sites": 3, "strategy.trim_beta": 0.25,
                                    "strategy.proximal_mu": 0.3})
    strategy = build_strategy(cfg, get_task("heart-disease"))
    rng = np.random.default_rng(0)
    g = {"linear.weight": rng.normal(size=(1, 13)).astype(np.float32),
         "linear.bias": np.zeros(1, np.float32)}
    updates = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
               for _ in range(4)]
    res = run_round(strategy, g, updates, losses=[0.4, 0.5, 0.6, 0.7])
    agg = res.state
    assert set(agg) == set(g) and all(agg[k].shape == g[k].shape and agg[k].dtype == np.float32 for k in g)
    assert all(np.isfinite(v).all() for v in agg.values())
    assert np.linalg.norm(agg["linear.weight"] - g["linear.weight"]) < 0.5
    if name == "krum":   # Krum reports the loss of the update it selected
        assert res.train_loss in (pytest.approx(0.4), pytest.approx(0.5), pytest.approx(0.6), pytest.approx(0.7))
    else:
        assert res.train_loss == pytest.approx(0.55)
    assert strategy.train_config == ({"proximal-mu": pytest.approx(0.3)} if name == "fedprox" else {})


def test_bad_combinations_are_config_errors():
    heart = get_task("heart-disease")
    with pytest.raises(ConfigError, match="needs a LoRA task"):
        build_strategy(cfg_for(**{"lora.aggregation": "exact"}), heart)
    with pytest.raises(ConfigError, match="personalize=lora_B"):
        build_strategy(cfg_for(**{"lora.aggregation": "ffa", "lora.personalize": "lora_B"}), LoraTaskContract())
    with pytest.raises(ConfigError, match="trims nothing at 4 sites"):
        build_strategy(cfg_for("trimmedavg", sites=4, **{"strategy.trim_beta": 0.2}), heart)   # 4 fixed sites
    with pytest.raises(ConfigError, match="trim_beta"):
        build_strategy(cfg_for("trimmedavg", **{"strategy.trim_beta": 0.6}), LoraTaskContract())
    with pytest.raises(ConfigError, match="strategy.tau must be positive"):
        build_strategy(cfg_for("fedyogi", **{"strategy.tau": 0.0}), heart)
    with pytest.raises(ConfigError, match="exceeds lora.r"):
        build_strategy(cfg_for(**{"lora.site_ranks": "4,16", "lora.r": 8}), LoraTaskContract())
    with pytest.raises(ConfigError, match="ffa needs one rank"):
        build_strategy(cfg_for(**{"lora.site_ranks": "4,8", "lora.aggregation": "ffa"}), LoraTaskContract())
    with pytest.raises(ConfigError, match="needs a LoRA task"):
        build_strategy(cfg_for(**{"lora.site_ranks": "4,8"}), heart)
    with pytest.raises(ConfigError, match="mean of the clipped"):
        build_strategy(cfg_for("fedadam", **{"dp.level": "client", "dp.noise_multiplier": 1.0}), heart)
    # allowed: any strategy with exact or ffa on a LoRA task
    for name in strategy_names():
        for mode in ("naive", "ffa", "exact"):
            s = build_strategy(cfg_for(name, **{"lora.aggregation": mode, "strategy.trim_beta": 0.2}),
                               LoraTaskContract())
            assert s.lora.mode == mode and s.name == name


# ---------------------------------------------------------------- LoRA aggregation
def test_exact_mode_equals_weighted_mean_of_products():
    rng = np.random.default_rng(1)
    cfg = cfg_for("fedavg", sites=2, **{"lora.aggregation": "exact", "lora.r": 8, "lora.alpha": 16})
    strategy = build_strategy(cfg, LoraTaskContract())
    g = lora_global(rng, r=8)
    sites = [lora_update(rng, g, r=4), lora_update(rng, g, r=4)]   # 2 sites of rank 4 -> rank 8 suffices
    res = run_round(strategy, g, sites, nums=[30, 10])
    agg = res.state
    scale = lambda r: 16 / r  # noqa: E731
    want = {k: 0.75 * sites[0][k] + 0.25 * sites[1][k] for k in sites[0]}
    d0, d1 = effective_deltas(sites[0], scale), effective_deltas(sites[1], scale)
    got = effective_deltas(agg, scale)
    for k in got:
        target = 0.75 * d0[k] + 0.25 * d1[k]
        assert np.linalg.norm(got[k] - target) / np.linalg.norm(target) < 1e-6
    np.testing.assert_allclose(agg[HEAD], want[HEAD], rtol=1e-6)
    assert lora_rank(agg) == 8 and list(agg) == list(g)
    assert res.diagnostics["svd_rel_error"] < 1e-7
    assert res.diagnostics["lora_rank_min"] == 4


def test_exact_mode_reports_truncation_when_rank_is_short():
    rng = np.random.default_rng(2)
    strategy = build_strategy(cfg_for("fedavg", sites=3, **{"lora.aggregation": "exact", "lora.r": 4}),
                              LoraTaskContract())
    g = lora_global(rng, r=4)
    res = run_round(strategy, g, [lora_update(rng, g) for _ in range(3)])
    ref = exact_aggregate([lora_update(np.random.default_rng(0), g)], [1], 4)  # shape reference only
    assert set(res.state) == set(ref.state)
    assert 1e-3 < res.diagnostics["svd_rel_error"] < 1


def test_naive_mode_averages_factors_separately():
    rng = np.random.default_rng(3)
    strategy = build_strategy(cfg_for("fedavg", sites=2), LoraTaskContract())
    g = lora_global(rng)
    sites = [lora_update(rng, g), lora_update(rng, g)]
    res = run_round(strategy, g, sites)
    for k in g:
        np.testing.assert_allclose(res.state[k], 0.5 * (sites[0][k] + sites[1][k]), rtol=1e-5, atol=1e-7)
    assert "svd_rel_error" not in res.diagnostics
    np.testing.assert_allclose(weighted_mean(sites, [1, 1])[HEAD], res.state[HEAD], rtol=1e-7)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "qfedavg", "fedmedian", "krum"])
def test_exact_mode_composes_with_other_rules(name):
    rng = np.random.default_rng(4)
    cfg = cfg_for(name, sites=5, **{"lora.aggregation": "exact", "lora.r": 8, "strategy.krum_f": 1})
    strategy = build_strategy(cfg, LoraTaskContract())
    g = lora_global(rng)
    sites = [lora_update(rng, g, r=2) for _ in range(5)]
    res = run_round(strategy, g, sites)
    agg = res.state
    assert list(agg) == list(g) and all(agg[k].shape == g[k].shape for k in g)
    assert all(np.isfinite(v).all() for v in agg.values())
    assert "svd_rel_error" in res.diagnostics
    if name == "krum":   # one site's product (rank 2) is chosen: representable exactly
        assert res.diagnostics["svd_rel_error"] < 1e-7
        scale = lambda r: 16 / r  # noqa: E731
        got = effective_deltas(agg, scale)
        assert any(all(np.allclose(got[k], effective_deltas(s, scale)[k], rtol=1e-4, atol=1e-6) for k in got)
                   for s in sites)


def test_ffa_mode_aggregates_b_only_and_rejects_a():
    rng = np.random.default_rng(5)
    strategy = build_strategy(cfg_for("fedavg", sites=2, **{"lora.aggregation": "ffa"}), LoraTaskContract())
    g = {k: v for k, v in lora_global(rng).items() if ".lora_A." not in k}   # A never travels
    sites = [lora_update(rng, g), lora_update(rng, g)]
    agg = run_round(strategy, g, sites).state
    assert not any(".lora_A." in k for k in agg)
    np.testing.assert_allclose(agg[B0], 0.5 * (sites[0][B0] + sites[1][B0]), rtol=1e-5)
    with_a = [dict(s, **{A0: np.zeros((8, 16), np.float32)}) for s in sites]
    with pytest.raises(ValueError, match="lora_A must stay at the site"):
        run_round(strategy, g, with_a)


def test_heterogeneous_ranks_naive_and_exact():
    rng = np.random.default_rng(6)
    for mode in ("naive", "exact"):
        strategy = build_strategy(cfg_for("fedavg", sites=3, **{"lora.aggregation": mode, "lora.r": 8}),
                                  LoraTaskContract())
        g = lora_global(rng)
        site_ranks = [2, 4, 8]
        sent = [per_site_arrays(strategy.lora, g, r) for r in site_ranks]
        assert [lora_rank(s) for s in sent] == site_ranks
        sites = [lora_update(rng, s) for s in sent]
        res = run_round(strategy, g, sites)
        agg = res.state
        assert lora_rank(agg) == 8 and all(agg[k].shape == g[k].shape for k in g)
        assert res.diagnostics["lora_rank_min"] == 2
        assert res.diagnostics["lora_rank_max"] == 8
        scale = lambda r: 16 / r  # noqa: E731
        target = {k: sum(effective_deltas(s, scale)[k] for s in sites) / 3 for k in effective_deltas(g)}
        got = effective_deltas(agg, scale)
        err = np.sqrt(sum(np.linalg.norm(got[k] - target[k]) ** 2 for k in target)
                      / sum(np.linalg.norm(target[k]) ** 2 for k in target))
        if mode == "exact":
            assert err == pytest.approx(res.diagnostics["svd_rel_error"], rel=1e-3)
        else:
            assert err > 0.05   # naive (zero-padding) is not the mean update


@pytest.mark.parametrize("name", RULES)
def test_rules_leave_the_updates_and_the_global_state_as_they_were(name):
    """Flower's FedMedian and FedTrimmedAvg popped arrays out of the replies they
    aggregated and q-FedAvg worked in place; the rules here read their inputs only."""
    rng = np.random.default_rng(7)
    strategy = build_strategy(cfg_for(name, sites=3, **{"strategy.krum_f": 0, "strategy.trim_beta": 0.34}),
                              LoraTaskContract())
    g = lora_global(rng)
    updates = updates_of([lora_update(rng, g) for _ in range(3)])
    before = [dataclasses.replace(u, arrays={k: v.copy() for k, v in u.arrays.items()}) for u in updates]
    g_before = {k: v.copy() for k, v in g.items()}
    aggregate(strategy, updates, g, 1)
    for u, b in zip(updates, before):
        assert set(u.arrays) == set(g) and all(np.array_equal(u.arrays[k], b.arrays[k]) for k in g)
    assert all(np.array_equal(g[k], g_before[k]) for k in g)


# ------------------------------------------------------------------ hostile site
def hostile(kind, g, honest_deltas, rng):
    mean = np.mean(honest_deltas, axis=0)
    if kind == "scaled":
        return g + 100 * honest_deltas[0]
    if kind == "sign_flipped":
        return g - 20 * mean
    return g + rng.normal(scale=20 * np.abs(mean).mean(), size=g.shape)   # random


@pytest.mark.parametrize("kind", ["scaled", "sign_flipped", "random"])
def test_hostile_site_bounded_by_robust_rules_and_damages_fedavg(kind):
    rng = np.random.default_rng(8)
    dim = 200
    g_vec = rng.normal(size=dim).astype(np.float32)
    direction = rng.normal(size=dim)
    honest_deltas = np.stack([direction + 0.1 * rng.normal(size=dim) for _ in range(4)])
    updates = [g_vec + d for d in honest_deltas] + [hostile(kind, g_vec, honest_deltas, rng)]
    honest_mean = g_vec + honest_deltas.mean(axis=0)
    honest_spread = max(np.linalg.norm(d - honest_deltas.mean(axis=0)) for d in honest_deltas)

    def split(v):   # one model = a weight matrix and a bias, as sites send it
        return {"w": v[:190].reshape(10, 19).astype(np.float32), "b": v[190:].astype(np.float32)}

    def flat(s):
        return np.concatenate([s["w"].ravel(), s["b"]])

    distances = {}
    for name in ("fedavg", "krum", "fedmedian", "trimmedavg"):
        cfg = cfg_for(name, sites=5, **{"strategy.krum_f": 1, "strategy.trim_beta": 0.2})
        strategy = build_strategy(cfg, FullTaskContract())
        agg = run_round(strategy, split(g_vec), [split(u) for u in updates]).state
        distances[name] = float(np.linalg.norm(flat(agg) - honest_mean))
    for name in ("krum", "fedmedian", "trimmedavg"):
        assert distances[name] < 1.5 * honest_spread, (name, distances)
    assert distances["fedavg"] > 10 * honest_spread, distances


# ------------------------------------------------- end to end: heterogeneous ranks
@pytest.mark.e2e
def test_heterogeneous_ranks_end_to_end_on_medical_abstracts(tmp_path):
    """Real ServerApp loop and ClientApp handlers (the in-process grid: same Flower
    messages, no SuperLink start-up), real MiniLM + peft sites of ranks 2, 4 and 8, exact
    aggregation (naive zero-padding is covered above with real Flower messages).
    Every site learns from round 1: the rank-2 and rank-4 sites start from the SVD of a
    zero product, whose spare components must stay trainable, so the three products
    (ranks 2 + 4 + 8 > 8) need truncation in every round."""
    mode = "exact"
    from fedcare.launch import resolve_config
    from fedcare.server.federation import run_federation
    from fedcare.server.local_grid import InProcessGrid
    from fedcare.server.report import build_report
    from fedcare.server.store import Store

    db = f"sqlite:///{tmp_path}/hetero.db"
    cfg = resolve_config("medical-abstracts", [
        "train.mode=lora", "lora.site_ranks=2,4,8", f"lora.aggregation={mode}", "lora.r=8", "train.local_steps=1",
        "data.max_train_per_site=8", "data.max_test_per_site=4", "train.batch_size=4"], sites=3, rounds=2, seed=7)
    cfg.runtime.db = db
    run_id = run_federation(InProcessGrid(cfg, cfg.sites), cfg)
    store = Store(db)
    try:
        rep = build_report(store, run_id)
    finally:
        store.close()
    assert rep["status"] == "completed" and len(rep["rounds"]) == 2
    for rnd in rep["rounds"]:
        assert [s["accepted"] for s in rnd["sites"]] == [True] * 3, rnd["sites"]
        assert rnd["metrics"]["lora_rank_min"] == 2 and rnd["metrics"]["lora_rank_max"] == 8
        assert 0 < rnd["metrics"]["svd_rel_error"] < 1
    by_site = {s["site"]: s["update_bytes"] for s in rep["rounds"][-1]["sites"]}
    assert by_site["site-0"] < by_site["site-1"] < by_site["site-2"]   # rank 2 < 4 < 8 bytes
    assert rep["final"]["metrics"].get("accuracy") is not None
