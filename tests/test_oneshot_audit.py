"""One-shot empirical privacy estimation (Andrew et al. 2024) over fedcare's aggregation
paths: no DP is caught, honest client-level and distributed DP at epsilon 8 are not."""
import numpy as np
import pytest

from fedcare import oneshot_audit as O
from fedcare.accounting import gaussian_noise_lower_bound
from fedcare.config import RunConfig

DIM, ROUNDS, CANARIES, FRESH, REAL, DELTA = 10_000, 5, 200, 2000, 10, 1e-5


def run(path, seed=0):
    rng = np.random.default_rng(seed)
    return O.audit(path, O.QuadraticSites.make(REAL, DIM, rng), ROUNDS, CANARIES, FRESH, 1.0, DELTA, rng)


def test_gaussian_dp_conversion_agrees_with_the_analytic_gaussian_mechanism():
    z = gaussian_noise_lower_bound(8.0, DELTA, 1)      # one release at epsilon exactly 8 (scipy)
    assert O.gdp_epsilon(1 / z, DELTA) == pytest.approx(8.0, abs=1e-3)
    assert O.gdp_delta(O.gdp_epsilon(2.0, 1e-6), 2.0) == pytest.approx(1e-6, rel=1e-3)
    assert O.gdp_epsilon(0.0, DELTA) == 0.0 and O.gdp_epsilon(0.5, DELTA) < O.gdp_epsilon(1.0, DELTA)


def test_without_dp_the_canaries_stand_out():
    est = run(O.fedavg_path)
    assert est.epsilon_low > 8 and est.epsilon > 20, est
    assert abs(est.mean_out) < 3 * est.std_out / np.sqrt(FRESH)   # fresh directions: no signal


def test_client_level_dp_at_epsilon_8_is_consistent_with_its_accountant():
    """Server-side Gaussian noise with every site in every round is a tight mechanism: the
    final model's cosine is exactly its mu-GDP statistic, so the estimate sits at about
    the accountant's epsilon; the check is that 8 lies within (or above) its 95% interval.
    Half the noise (mu doubled, epsilon ~20) would put the interval above 8."""
    cfg = RunConfig.from_flat({"dp.level": "client", "dp.epsilon": 8.0, "dp.delta": DELTA,
                               "dp.max_grad_norm": 1.0, "rounds": ROUNDS})
    est = run(O.client_dp_path(cfg))
    assert est.epsilon_low < 8 and est.epsilon < 9, est
    assert est.epsilon > 3, est        # not vacuous: the canaries are seen


def test_distributed_dp_at_epsilon_8_stays_below_8():
    """Skellam noise from every client, calibrated so that a sum of all of them (real
    sites and canaries) meets epsilon 8 over the run."""
    cfg = RunConfig.from_flat({"secagg.enabled": True, "secagg.epsilon": 8.0, "dp.delta": DELTA,
                               "secagg.clip": 1.0, "rounds": ROUNDS, "secagg.min_sites_in_sum": REAL + CANARIES})
    est = run(O.secagg_path(cfg, REAL + CANARIES, DIM))
    assert est.epsilon < 8 and est.epsilon > 2, est


def test_secure_aggregation_without_noise_is_caught_like_plain_fedavg():
    cfg = RunConfig.from_flat({"secagg.enabled": True, "secagg.clip": 1.0, "rounds": ROUNDS})
    assert run(O.secagg_path(cfg, REAL + CANARIES, DIM)).epsilon_low > 8


def test_the_audits_ring_sum_is_what_the_masking_protocol_unmasks():
    cfg = RunConfig.from_flat({"secagg.enabled": True, "secagg.epsilon": 8.0, "secagg.clip": 1.0,
                               "secagg.min_sites_in_sum": 6})
    updates = list(np.random.default_rng(1).standard_normal((6, 300)))
    fast, protocol = (O.secagg_path(cfg, 6, 300, protocol=p)(updates, np.random.default_rng(2)) for p in (False, True))
    assert np.array_equal(fast, protocol)
    clipped = np.mean([u / np.linalg.norm(u) for u in updates], axis=0)
    assert np.abs(fast - clipped).max() > 100 / (2 ** 15 - 1)   # Skellam noise, far above rounding
