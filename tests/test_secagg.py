"""Secure aggregation's protocol: exact sums, dropouts, refusals, what the coordinator sees."""
import numpy as np
import pytest
from scipy import stats

from fedcare import secagg as SA
from fedcare.accounting import secagg_epsilon, secagg_sensitivity, skellam_epsilon
from fedcare.client.secagg import SiteSession
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PolicyRefusal
from fedcare.launch import resolve_config
from fedcare.secagg_local import run_local
from fedcare.server.federation import run_federation
from fedcare.server.local_grid import InProcessGrid
from fedcare.server.store import Store
from fedcare.strategies.secagg import Coordinator, SecAggFailed, check_secagg_config


def params(n, **kw):
    d = SA.auto_degree(n)
    base = dict(clip=1.0, bits=16, degree=d, threshold=d // 2 + 1, weight_cap=1024, noise_mu=0.0, min_in_sum=2)
    return SA.Params(**{**base, **kw})


def updates(n, dim=200, seed=0):
    rng = np.random.default_rng(seed)
    deltas = {100 + i: rng.normal(0, 0.02, dim) for i in range(n)}
    return deltas, {100 + i: int(rng.integers(20, 300)) for i in range(n)}


def encode(deltas, weights, p, seed=1):
    rng = np.random.default_rng(seed)
    quantized = {k: SA.quantize(v, p, rng) for k, v in deltas.items()}
    inputs = {k: SA.to_ring(np.append(q * weights[k], weights[k])) for k, q in quantized.items()}
    return quantized, inputs


def test_unmasked_sum_is_the_exact_sum_of_quantized_updates_and_fedavg_within_the_bound():
    p = params(6)
    deltas, weights = updates(6)
    quantized, inputs = encode(deltas, weights, p)
    run = run_local(inputs, p)
    expected = sum(np.append(quantized[k] * weights[k], weights[k]) for k in deltas)
    assert np.array_equal(SA.from_ring(run.total), expected)
    mean, total_w = SA.decode_sum(run.total, p)
    fedavg = sum(deltas[k] * weights[k] for k in deltas) / sum(weights.values())
    assert total_w == sum(weights.values())
    bound = p.clip / (2 ** (p.bits - 1) - 1)   # stated in fedcare/secagg.py
    assert np.max(np.abs(mean - fedavg)) < bound
    assert np.max(np.abs(mean - fedavg)) > 0    # it is quantized, not the floats smuggled through


def test_a_third_dropping_after_masking_and_one_before_still_gives_the_survivors_sum():
    n = 12
    p = params(n)
    deltas, weights = updates(n, seed=3)
    quantized, inputs = encode(deltas, weights, p)
    nodes = sorted(inputs)
    before, after = {nodes[0]}, set(nodes[3:7])     # after masking: their inputs count, they reveal nothing
    run = run_local(inputs, p, drop_after_shares=before, drop_after_mask=after)
    assert set(run.survivors) == set(nodes) - before
    expected = sum(np.append(quantized[k] * weights[k], weights[k]) for k in run.survivors)
    assert np.array_equal(SA.from_ring(run.total), expected)


def test_harary_graph_at_50_sites_is_sparse_and_sums_right():
    n = 50
    p = params(n, bits=12)
    assert p.degree < n - 1 and p.degree % 2 == 0
    deltas, weights = updates(n, dim=20, seed=5)
    quantized, inputs = encode(deltas, weights, p)
    nodes = sorted(inputs)
    run = run_local(inputs, p, drop_after_shares={nodes[7], nodes[30]})
    expected = sum(np.append(quantized[k] * weights[k], weights[k]) for k in run.survivors)
    assert np.array_equal(SA.from_ring(run.total), expected)


def test_shamir_any_threshold_shares_give_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = SA.share(secret, 3, 5)
    assert {SA.combine([shares[i] for i in idx]) for idx in [(0, 1, 2), (4, 2, 0), (1, 3, 4)]} == {secret}
    try:
        assert SA.combine(shares[:2]) != secret
    except ValueError:     # two points of a degree-2 polynomial: almost surely not a 32-byte value
        pass
    with pytest.raises(ValueError):
        SA.combine([shares[0], shares[0], shares[1]])


def _sessions_after_masking(n=5):
    p = params(n, min_in_sum=3)
    deltas, weights = updates(n, dim=10)
    _, inputs = encode(deltas, weights, p)
    key = b"k" * 16
    sessions = {node: SiteSession(p, key) for node in inputs}
    coord = Coordinator(p, key, {node: s.advertise(inputs[node]) for node, s in sessions.items()})
    shares = {node: s.share_keys(*coord.key_request(node)) for node, s in sessions.items()}
    inbox = coord.route_shares(shares)
    masked = {node: sessions[node].mask(inbox[node]) for node in sessions}
    coord.collect_masked(masked)
    return sessions, coord, sorted(sessions)


def test_a_site_refuses_to_reveal_both_secrets_of_one_neighbour():
    sessions, coord, nodes = _sessions_after_masking()
    me = sessions[nodes[0]]
    with pytest.raises(PolicyRefusal, match="both"):     # in one request
        me.unmask([1, 2], [2], 5)
    me.unmask([1, 2, 3], [], 5)                          # honest: 1, 2, 3 survived
    with pytest.raises(PolicyRefusal, match="self-mask share was revealed"):
        me.unmask([4], [1], 5)                           # later: "1 dropped after all"


def test_a_site_refuses_when_the_coordinator_reports_dropouts_that_would_isolate_a_site():
    sessions, coord, nodes = _sessions_after_masking()
    me = sessions[nodes[0]]
    with pytest.raises(PolicyRefusal, match="fewer than the 3 required"):
        me.unmask([1], [2, 3, 4], 2)   # a "sum" of this site and one other
    with pytest.raises(PolicyRefusal, match="fewer than the threshold"):
        me.unmask([], [1, 2, 3, 4], 5)


def test_a_site_refuses_keys_that_are_not_its_graph_neighbours_and_shares_that_do_not_authenticate():
    p = params(5)
    s = SiteSession(p, b"k" * 16)
    s.advertise(np.zeros(3, dtype=np.uint32))
    other = SiteSession(p, b"k" * 16)
    keys = {j: other.advertise(np.zeros(3, dtype=np.uint32)) if j == 1 else (SA.public_bytes(SA.new_key()),
            SA.public_bytes(SA.new_key())) for j in (1, 2, 3)}
    with pytest.raises(PolicyRefusal, match="neighbours"):
        s.share_keys(0, 5, keys)     # neighbour 4 left out: a smaller graph than the round's
    sessions, coord, nodes = _sessions_after_masking()
    fresh = SiteSession(params(5), b"k" * 16)
    fresh.advertise(np.zeros(11, dtype=np.uint32))
    fresh.share_keys(*coord.key_request(nodes[0]))
    forged = {j: b"\x00" * 12 + b"x" * 120 for j in (1, 2, 3)}
    with pytest.raises(PolicyRefusal, match="authenticate"):
        fresh.mask(forged)


def test_the_coordinator_cannot_unmask_with_fewer_shares_than_the_threshold():
    sessions, coord, nodes = _sessions_after_masking()
    revealed = {nodes[0]: sessions[nodes[0]].unmask(*coord.unmask_request(nodes[0]))}
    with pytest.raises(SecAggFailed, match="fewer than the threshold"):
        coord.unmask(revealed)


def test_masked_inputs_are_indistinguishable_from_uniform_and_carry_no_plain_update():
    n = 6
    p = params(n)
    deltas, weights = updates(n, dim=4000, seed=9)
    quantized, inputs = encode(deltas, weights, p)
    run = run_local(inputs, p)
    for y, x in zip(run.seen["masked"], inputs.values()):
        counts = np.bincount(np.frombuffer(y.tobytes(), dtype=np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
        assert stats.kstest(y / 2 ** 32, "uniform").pvalue > 1e-3
        # the plain input is far from uniform (small integers around 0 mod 2^32)
        assert stats.kstest(x / 2 ** 32, "uniform").pvalue < 1e-6
    # a capture of everything the coordinator received holds no site's plain input
    blob = b"".join(y.tobytes() for y in run.seen["masked"]) + b"".join(
        v for out in run.seen["shares"] for v in out.values())
    for x, delta in zip(inputs.values(), deltas.values()):
        for plain in (x[:64].tobytes(), delta[:16].tobytes(), delta[:16].astype(np.float32).tobytes()):
            assert plain not in blob


def test_skellam_noise_sums_to_the_runs_noise_and_the_accountant_meets_its_target():
    cfg = RunConfig()
    cfg.secagg.enabled, cfg.secagg.epsilon, cfg.rounds = True, 8.0, 5
    p = SA.params_of(cfg, 4, dim=14)
    assert p.noise_mu > 0 and p.weight_cap == 1
    eps = secagg_epsilon(p, 14, cfg.rounds, cfg.dp.delta)
    assert 7.0 < eps <= 8.0
    l1, l2 = secagg_sensitivity(p, 14)    # a sum of fewer sites than assumed carries too little noise
    assert skellam_epsilon(p.noise_mu * (p.min_in_sum - 1), l1, l2, cfg.rounds, cfg.dp.delta) > 8.0
    rng = np.random.default_rng(0)
    total = sum(SA.skellam(p.noise_mu, 20000, rng) for _ in range(4))
    assert np.var(total) == pytest.approx(2 * p.noise_mu * 4, rel=0.05)


def test_rules_that_need_individual_updates_are_refused_in_one_line():
    for key, value, words in [("strategy.name", "krum", "Krum"), ("strategy.name", "fedmedian", "median"),
                              ("strategy.name", "trimmedavg", "trimmed"), ("lora.aggregation", "exact", "SVD"),
                              ("strategy.screen_norm_factor", "3", "norm"), ("dp.level", "client", "distributed")]:
        cfg = RunConfig.from_flat({"secagg.enabled": True, key: value})
        with pytest.raises(ConfigError, match=words) as err:
            check_secagg_config(cfg, 4)
        assert "\n" not in str(err.value)
    check_secagg_config(RunConfig.from_flat({"secagg.enabled": True, "strategy.name": "fedprox"}), 4)
    with pytest.raises(ConfigError, match="half the degree"):
        check_secagg_config(RunConfig.from_flat({"secagg.enabled": True, "secagg.threshold": 1}), 5)


def test_a_site_policy_requires_secure_aggregation_and_raises_the_minimum_sum(tmp_path):
    from fedcare.client.policy import SitePolicy

    path = tmp_path / "policy.toml"
    path.write_text("[privacy]\nrequire_secure_aggregation = true\nmin_sites_in_sum = 4\n")
    pol = SitePolicy.load(path)
    with pytest.raises(PolicyRefusal, match="secure aggregation is required"):
        pol.check(RunConfig(), {}, 100)
    pol.check(RunConfig.from_flat({"secagg.enabled": True}), {}, 100)
    session = SiteSession(params(5, min_in_sum=2), b"k" * 16, pol.min_sites_in_sum)
    assert session.min_in_sum == 4


class CapturingGrid(InProcessGrid):
    """The real round loop and ClientApp handlers; keeps every reply the coordinator pulls."""

    def __init__(self, cfg, num_sites):
        super().__init__(cfg, num_sites)
        self.received = []

    def pull_messages(self, message_ids):
        got = list(super().pull_messages(message_ids))
        self.received.extend(got)
        return got


def _received_bytes(replies) -> tuple[bytes, list[bytes]]:
    """(every byte string the replies carry, each array's data)."""
    blobs, arrays = [], []
    for r in replies:
        if r.has_error():
            continue
        for rec in r.content.array_records.values():
            arrays += [a.data for a in rec.values()]
        for rec in r.content.config_records.values():
            for v in rec.values():
                values = v if isinstance(v, list) else [v]
                blobs += [x for x in values if isinstance(x, bytes)]
    return b"".join(blobs + arrays), arrays


def test_the_round_loop_gives_fedavgs_model_within_the_bound_and_receives_no_plain_update(tmp_path):
    states, grids = {}, {}
    for secure in (False, True):
        cfg = resolve_config("heart-disease", ["train.local_steps=5", f"secagg.enabled={secure}", "secagg.clip=10"],
                             rounds=1, seed=3)
        cfg.runtime.db = f"sqlite:///{tmp_path}/{secure}.db"
        grids[secure] = CapturingGrid(cfg, 4)
        run_id = run_federation(grids[secure], cfg)
        store = Store(cfg.runtime.db)
        try:
            states[secure] = store.load_global_state(run_id, 1)
            assert store.rounds(run_id)[0]["metrics"]["secagg_survivors" if secure else "aggregated"] >= 1
        finally:
            store.close()
    bound = 10 / (2 ** 15 - 1)
    diff = max(float(np.max(np.abs(states[True][k] - states[False][k]))) for k in states[False])
    assert 0 < diff < bound
    _, plain_updates = _received_bytes(r for r in grids[False].received if r.metadata.message_type == "train")
    captured, _ = _received_bytes(grids[True].received)
    assert len(plain_updates) == 4 * len(states[False])
    assert not any(u[-16:] in captured for u in plain_updates)
