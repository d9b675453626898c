"""Strategies by name, LoRA-aware aggregation and robustness, with real Flower strategy
objects fed real ``flwr.app.Message`` replies built the way a ServerApp receives them
(``Message(content, reply_to=instruction)``: the reply's src_node_id is the site's node).

The only stand-in is ``NodesGrid``: strategies use a Grid in ``configure_train`` just
to list node ids, and a real SuperLink is not needed for that."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.base import Task
from fedcare.models.registry import get_task
from fedcare.records import from_array_record, to_array_record
from fedcare.schemas import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE, SITE_ID, TRAIN_LOSS
from fedcare.strategies.hetero import per_site_arrays
from fedcare.strategies.lora import effective_deltas, exact_aggregate, lora_rank
from fedcare.strategies.registry import build_strategy, strategy_names

A0 = "base_model.model.layer.0.query.lora_A.default.weight"
B0 = "base_model.model.layer.0.query.lora_B.default.weight"
A1 = "base_model.model.layer.1.value.lora_A.default.weight"
B1 = "base_model.model.layer.1.value.lora_B.default.weight"
HEAD = "base_model.model.classifier.weight"


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


def run_round(strategy, global_state, site_states, nums=None, losses=None, rnd=1):
    """configure_train -> replies as a ServerApp receives them -> aggregate_train."""
    grid = NodesGrid(range(101, 101 + len(site_states)))
    instructions = list(strategy.configure_train(rnd, to_array_record(global_state), ConfigRecord(), grid))
    assert len(instructions) == len(site_states)
    replies = []
    for i, (ins, state) in enumerate(zip(sorted(instructions, key=lambda m: m.metadata.dst_node_id),
                                         site_states)):
        content = RecordDict({
            ARRAYS: to_array_record(state),
            METRICS: MetricRecord({NUM_EXAMPLES: (nums or [50] * len(site_states))[i],
                                   TRAIN_LOSS: (losses or [0.5] * len(site_states))[i]}),
            SITE: ConfigRecord({SITE_ID: f"site-{i}"}),
        })
        reply = Message(content, reply_to=ins)
        assert reply.metadata.src_node_id == 101 + i
        replies.append(reply)
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return (dict(from_array_record(arrays)) if arrays is not None else None), metrics, replies, instructions


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


@pytest.mark.parametrize("name,mode", [("fedavg", "naive"), ("fedmedian", "exact"), ("fedadam", "naive")])
def test_aggregating_decoded_states_equals_aggregating_the_replies(name, mode):
    """The round loop hands the strategy each reply's arrays as decoded once at the
    boundary (``aggregate_states``): the same result as Flower's ``aggregate_train`` on
    the messages, and the replies themselves are left whole."""
    rng = np.random.default_rng(3)
    g = lora_global(rng)
    sites = [lora_update(rng, g) for _ in range(3)]
    sets = {"lora.aggregation": mode, "lora.r": 8, "lora.alpha": 16}
    via_messages, _, replies, _ = run_round(build_strategy(cfg_for(name, sites=3, **sets), LoraTaskContract()), g,
                                            sites)
    strategy = build_strategy(cfg_for(name, sites=3, **sets), LoraTaskContract())
    list(strategy.configure_train(1, to_array_record(g), ConfigRecord(), NodesGrid(range(101, 104))))
    state, _ = strategy.aggregate_states(1, list(zip(replies, sites)))
    assert set(state) == set(via_messages)
    for k in state:
        np.testing.assert_allclose(state[k], via_messages[k], rtol=1e-5, atol=1e-6)
    assert all(set(m.content[ARRAYS].keys()) == set(g) for m in replies)


# ------------------------------------------------------------------------ registry
def test_names_and_unknown_name():
    assert strategy_names() == ["fedavg", "fedprox", "fedadam", "fedyogi", "qfedavg",
                                "fedmedian", "trimmedavg", "krum"]
    with pytest.raises(ConfigError, match="fedavg, fedprox, fedadam"):
        build_strategy(cfg_for("fedsgdx"), get_task("heart-disease"))


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "qfedavg",
                                  "fedmedian", "trimmedavg", "krum"])
def test_every_strategy_runs_a_round_on_heart_disease_shapes(name):
    cfg = cfg_for(name, sites=4, **{"strategy.min_sites": 3, "strategy.trim_beta": 0.25,
                                    "strategy.proximal_mu": 0.3})
    strategy = build_strategy(cfg, get_task("heart-disease"))
    assert strategy.min_train_nodes == strategy.min_available_nodes == strategy.min_evaluate_nodes == 3
    assert strategy.fraction_train == 1.0
    rng = np.random.default_rng(0)
    g = {"linear.weight": rng.normal(size=(1, 13)).astype(np.float32),
         "linear.bias": np.zeros(1, np.float32)}
    updates = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
               for _ in range(4)]
    agg, metrics, _, instructions = run_round(strategy, g, updates, losses=[0.4, 0.5, 0.6, 0.7])
    assert set(agg) == set(g) and all(agg[k].shape == g[k].shape and agg[k].dtype == np.float32 for k in g)
    assert all(np.isfinite(v).all() for v in agg.values())
    assert np.linalg.norm(agg["linear.weight"] - g["linear.weight"]) < 0.5
    if name == "krum":   # Krum reports the metrics of the update it selected
        assert metrics[TRAIN_LOSS] in (pytest.approx(0.4), pytest.approx(0.5), pytest.approx(0.6), pytest.approx(0.7))
    else:
        assert metrics[TRAIN_LOSS] == pytest.approx(0.55)
    cfg_sent = instructions[0].content[CONFIG]
    assert cfg_sent["server-round"] == 1
    if name == "fedprox":
        assert cfg_sent["proximal-mu"] == pytest.approx(0.3)


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
    # allowed: any strategy with exact or ffa on a LoRA task
    for name in strategy_names():
        for mode in ("naive", "ffa", "exact"):
            s = build_strategy(cfg_for(name, **{"lora.aggregation": mode, "strategy.trim_beta": 0.2}),
                               LoraTaskContract())
            assert s.lora_mode == mode


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_learning_rate_and_adaptivity_reach_flowers_strategy(name):
    s = build_strategy(cfg_for(name, **{"strategy.eta": 0.2, "strategy.tau": 0.05}), get_task("heart-disease"))
    assert (s.base.eta, s.base.tau) == (0.2, 0.05)


# ---------------------------------------------------------------- LoRA aggregation
def test_exact_mode_through_flower_messages_equals_weighted_mean_of_products():
    rng = np.random.default_rng(1)
    cfg = cfg_for("fedavg", sites=2, **{"lora.aggregation": "exact", "lora.r": 8, "lora.alpha": 16})
    strategy = build_strategy(cfg, LoraTaskContract())
    g = lora_global(rng, r=8)
    sites = [lora_update(rng, g, r=4), lora_update(rng, g, r=4)]   # 2 sites of rank 4 -> rank 8 suffices
    agg, _, _, _ = run_round(strategy, g, sites, nums=[30, 10])
    scale = lambda r: 16 / r  # noqa: E731
    want = {k: 0.75 * sites[0][k] + 0.25 * sites[1][k] for k in sites[0]}
    d0, d1 = effective_deltas(sites[0], scale), effective_deltas(sites[1], scale)
    got = effective_deltas(agg, scale)
    for k in got:
        target = 0.75 * d0[k] + 0.25 * d1[k]
        assert np.linalg.norm(got[k] - target) / np.linalg.norm(target) < 1e-6
    np.testing.assert_allclose(agg[HEAD], want[HEAD], rtol=1e-6)
    assert lora_rank(agg) == 8 and list(agg) == list(g)
    assert strategy.last_diagnostics["svd_rel_error"] < 1e-7
    assert strategy.last_diagnostics["lora_rank_min"] == 4


def test_exact_mode_reports_truncation_when_rank_is_short():
    rng = np.random.default_rng(2)
    strategy = build_strategy(cfg_for("fedavg", sites=3, **{"lora.aggregation": "exact", "lora.r": 4}),
                              LoraTaskContract())
    g = lora_global(rng, r=4)
    agg, _, _, _ = run_round(strategy, g, [lora_update(rng, g) for _ in range(3)])
    ref = exact_aggregate([lora_update(np.random.default_rng(0), g)], [1], 4)  # shape reference only
    assert set(agg) == set(ref.state)
    assert 1e-3 < strategy.last_diagnostics["svd_rel_error"] < 1


def test_naive_mode_averages_factors_separately():
    rng = np.random.default_rng(3)
    strategy = build_strategy(cfg_for("fedavg", sites=2), LoraTaskContract())
    g = lora_global(rng)
    sites = [lora_update(rng, g), lora_update(rng, g)]
    agg, _, _, _ = run_round(strategy, g, sites)
    for k in g:
        np.testing.assert_allclose(agg[k], 0.5 * (sites[0][k] + sites[1][k]), rtol=1e-5, atol=1e-7)
    assert "svd_rel_error" not in strategy.last_diagnostics


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "qfedavg", "fedmedian", "krum"])
def test_exact_mode_composes_with_other_rules(name):
    rng = np.random.default_rng(4)
    cfg = cfg_for(name, sites=5, **{"lora.aggregation": "exact", "lora.r": 8, "strategy.krum_f": 1})
    strategy = build_strategy(cfg, LoraTaskContract())
    g = lora_global(rng)
    sites = [lora_update(rng, g, r=2) for _ in range(5)]
    agg, _, _, _ = run_round(strategy, g, sites)
    assert list(agg) == list(g) and all(agg[k].shape == g[k].shape for k in g)
    assert all(np.isfinite(v).all() for v in agg.values())
    assert "svd_rel_error" in strategy.last_diagnostics
    if name == "krum":   # one site's product (rank 2) is chosen: representable exactly
        assert strategy.last_diagnostics["svd_rel_error"] < 1e-7
        scale = lambda r: 16 / r  # noqa: E731
        got = effective_deltas(agg, scale)
        assert any(all(np.allclose(got[k], effective_deltas(s, scale)[k], rtol=1e-4, atol=1e-6) for k in got)
                   for s in sites)


def test_ffa_mode_aggregates_b_only_and_rejects_a():
    rng = np.random.default_rng(5)
    strategy = build_strategy(cfg_for("fedavg", sites=2, **{"lora.aggregation": "ffa"}), LoraTaskContract())
    g = {k: v for k, v in lora_global(rng).items() if ".lora_A." not in k}   # A never travels
    sites = [lora_update(rng, g), lora_update(rng, g)]
    agg, _, _, _ = run_round(strategy, g, sites)
    assert not any(".lora_A." in k for k in agg)
    np.testing.assert_allclose(agg[B0], 0.5 * (sites[0][B0] + sites[1][B0]), rtol=1e-5)
    with_a = [dict(s, **{A0: np.zeros((8, 16), np.float32)}) for s in sites]
    with pytest.raises(ValueError, match="lora_A must stay at the site"):
        run_round(strategy, g, with_a)


def test_heterogeneous_ranks_naive_and_exact_through_messages():
    rng = np.random.default_rng(6)
    for mode in ("naive", "exact"):
        strategy = build_strategy(cfg_for("fedavg", sites=3, **{"lora.aggregation": mode, "lora.r": 8}),
                                  LoraTaskContract())
        g = lora_global(rng)
        site_ranks = [2, 4, 8]
        sent = [per_site_arrays(strategy, g, r) for r in site_ranks]
        assert [lora_rank(s) for s in sent] == site_ranks
        sites = [lora_update(rng, s) for s in sent]
        agg, _, _, _ = run_round(strategy, g, sites)
        assert lora_rank(agg) == 8 and all(agg[k].shape == g[k].shape for k in g)
        assert strategy.last_diagnostics["lora_rank_min"] == 2
        assert strategy.last_diagnostics["lora_rank_max"] == 8
        scale = lambda r: 16 / r  # noqa: E731
        target = {k: sum(effective_deltas(s, scale)[k] for s in sites) / 3 for k in effective_deltas(g)}
        got = effective_deltas(agg, scale)
        err = np.sqrt(sum(np.linalg.norm(got[k] - target[k]) ** 2 for k in target)
                      / sum(np.linalg.norm(target[k]) ** 2 for k in target))
        if mode == "exact":
            assert err == pytest.approx(strategy.last_diagnostics["svd_rel_error"], rel=1e-3)
        else:
            assert err > 0.05   # naive (zero-padding) is not the mean update


def test_robust_rules_do_not_mutate_the_servers_replies():
    rng = np.random.default_rng(7)
    strategy = build_strategy(cfg_for("fedmedian", sites=3), LoraTaskContract())
    g = lora_global(rng)
    _, _, replies, _ = run_round(strategy, g, [lora_update(rng, g) for _ in range(3)])
    assert all(set(r.content[ARRAYS].keys()) == set(g) for r in replies)


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
        agg, _, _, _ = run_round(strategy, split(g_vec), [split(u) for u in updates])
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
