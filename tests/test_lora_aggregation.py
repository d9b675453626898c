"""LoRA aggregation math: exact vs naive, truncation error, heterogeneous ranks, FFA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcare.models.state import get_trainable_state
from fedcare.strategies.hetero import aggregate_mixed_ranks, pad_to_rank, truncate_for_site
from fedcare.strategies.lora import (
    effective_deltas,
    exact_aggregate,
    lora_pairs,
    lora_rank,
    naive_aggregate,
    to_product_space,
)
from fedcare.strategies.personal import split_personal
from fedcare.errors import ConfigError

PFX = "base_model.model.enc.{i}.query"


def lora_state(rng, rank, layers=2, d_in=12, d_out=10, head=True, conv=False):
    s = {}
    for i in range(layers):
        p = PFX.format(i=i)
        if conv:
            s[f"{p}.lora_A.default.weight"] = rng.normal(size=(rank, 3, 3, 3)).astype(np.float32)
            s[f"{p}.lora_B.default.weight"] = rng.normal(size=(d_out, rank, 1, 1)).astype(np.float32)
        else:
            s[f"{p}.lora_A.default.weight"] = rng.normal(size=(rank, d_in)).astype(np.float32)
            s[f"{p}.lora_B.default.weight"] = rng.normal(size=(d_out, rank)).astype(np.float32)
    if head:
        s["base_model.model.classifier.weight"] = rng.normal(size=(5, d_out)).astype(np.float32)
        s["base_model.model.classifier.bias"] = rng.normal(size=(5,)).astype(np.float32)
    return s


def weighted_products(states, weights, scale=None):
    w = np.asarray(weights, float) / np.sum(weights)
    deltas = [effective_deltas(s, scale) for s in states]
    return {k: sum(wi * d[k] for wi, d in zip(w, deltas)) for k in deltas[0]}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_exact_equals_weighted_mean_of_products_when_rank_suffices():
    rng = np.random.default_rng(0)
    states = [lora_state(rng, 4), lora_state(rng, 4)]
    weights = [30, 10]
    res = exact_aggregate(states, weights, rank=8)
    target = weighted_products(states, weights)
    got = effective_deltas(res.state)
    for k in target:
        assert rel(got[k], target[k]) < 1e-6
    assert res.rel_error < 1e-7
    assert lora_rank(res.state) == 8
    head = "base_model.model.classifier.weight"
    np.testing.assert_allclose(res.state[head], 0.75 * states[0][head] + 0.25 * states[1][head], rtol=1e-6)
    assert all(res.state[k].dtype == np.float32 for k in res.state)
    assert list(res.state) == list(states[0])


def test_exact_reports_truncation_error_when_rank_is_too_small():
    rng = np.random.default_rng(1)
    states = [lora_state(rng, 4) for _ in range(3)]
    res = exact_aggregate(states, [1, 1, 1], rank=4)   # mean of 3 rank-4 products: rank up to 12
    assert 1e-3 < res.rel_error < 1
    target = weighted_products(states, [1, 1, 1])
    got = effective_deltas(res.state)
    err = np.sqrt(sum(np.linalg.norm(got[k] - target[k]) ** 2 for k in target)
                  / sum(np.linalg.norm(target[k]) ** 2 for k in target))
    assert err == pytest.approx(res.rel_error, rel=1e-4)   # the reported error is the real one
    # and it is the best rank-4 approximation: SVD truncation beats naive averaging
    naive = effective_deltas(naive_aggregate(states, [1, 1, 1]))
    naive_err = np.sqrt(sum(np.linalg.norm(naive[k] - target[k]) ** 2 for k in target)
                        / sum(np.linalg.norm(target[k]) ** 2 for k in target))
    assert naive_err > err


def test_naive_differs_from_exact():
    """mean(B) mean(A) != mean(B A): naive averaging is not the average update."""
    rng = np.random.default_rng(2)
    states = [lora_state(rng, 4, head=False) for _ in range(2)]
    naive = effective_deltas(naive_aggregate(states, [1, 1]))
    exact = effective_deltas(exact_aggregate(states, [1, 1], rank=8).state)
    target = weighted_products(states, [1, 1])
    for k in target:
        assert rel(exact[k], target[k]) < 1e-6
        assert rel(naive[k], target[k]) > 0.3


def test_conv_lora_factors_are_flattened_and_restored():
    rng = np.random.default_rng(3)
    states = [lora_state(rng, 2, conv=True, head=False) for _ in range(2)]
    res = exact_aggregate(states, [1, 3], rank=4)
    for k, v in states[0].items():
        want = (4, *v.shape[1:]) if ".lora_A." in k else (v.shape[0], 4, *v.shape[2:])
        assert res.state[k].shape == want
    target = weighted_products(states, [1, 3])
    got = effective_deltas(res.state)
    for k in target:
        assert rel(got[k], target[k]) < 1e-6


def test_hetero_exact_aggregates_mixed_ranks_via_products():
    rng = np.random.default_rng(4)
    alpha = 16.0
    scale = lambda r: alpha / r  # noqa: E731  peft: alpha / r
    states = [lora_state(rng, 2), lora_state(rng, 4), lora_state(rng, 8)]
    template = lora_state(rng, 8)
    weights = [5, 3, 2]
    agg, err = aggregate_mixed_ranks(states, weights, 8, "exact", template, scale)
    assert lora_rank(agg) == 8
    target = weighted_products(states, weights, scale)
    got = effective_deltas(agg, scale)
    total_rank = 2 + 4 + 8
    assert err > 0 and total_rank > 8   # 14 > 8 components: some truncation
    err_direct = np.sqrt(sum(np.linalg.norm(got[k] - target[k]) ** 2 for k in target)
                         / sum(np.linalg.norm(target[k]) ** 2 for k in target))
    assert err_direct == pytest.approx(err, rel=1e-4)
    # when the ranks fit (2 + 4 <= 8) it is exact
    agg2, err2 = aggregate_mixed_ranks(states[:2], weights[:2], 8, "exact", template, scale)
    target2 = weighted_products(states[:2], weights[:2], scale)
    got2 = effective_deltas(agg2, scale)
    assert err2 < 1e-7
    for k in target2:
        assert rel(got2[k], target2[k]) < 1e-6


def test_hetero_naive_zero_pads_and_preserves_each_sites_update():
    rng = np.random.default_rng(5)
    scale = lambda r: 16.0 / r  # noqa: E731
    s2 = lora_state(rng, 2)
    padded = pad_to_rank(s2, 8, scale)
    assert lora_rank(padded) == 8
    # the padded factors in a rank-8 model give the same update as the rank-2 site
    for k, d in effective_deltas(s2, scale).items():
        np.testing.assert_allclose(effective_deltas(padded, scale)[k], d, rtol=1e-5, atol=1e-6)
    a_key = next(k for k in padded if ".lora_A." in k)
    assert np.all(padded[a_key][2:] == 0)
    s8 = lora_state(rng, 8)
    agg, err = aggregate_mixed_ranks([s2, s8], [1, 1], 8, "naive", s8, scale)
    assert err == 0.0
    np.testing.assert_allclose(agg[a_key][2:], 0.5 * s8[a_key][2:], rtol=1e-6)
    np.testing.assert_allclose(agg[a_key][:2], 0.5 * (s2[a_key] + s8[a_key][:2]), rtol=1e-6)


def test_truncate_for_site_exact_is_best_low_rank_approximation_and_naive_slices():
    rng = np.random.default_rng(6)
    scale = lambda r: 16.0 / r  # noqa: E731
    g = lora_state(rng, 8)
    site = truncate_for_site(g, 3, "exact", scale)
    assert lora_rank(site) == 3
    gd, sd = effective_deltas(g, scale), effective_deltas(site, scale)
    for k in gd:
        s = np.linalg.svd(gd[k], compute_uv=False)
        best = np.sqrt(np.sum(s[3:] ** 2))   # Eckart-Young
        assert np.linalg.norm(gd[k] - sd[k]) == pytest.approx(best, rel=1e-4)
    sliced = truncate_for_site(g, 3, "naive", scale)
    a_key = next(k for k in g if ".lora_A." in k)
    np.testing.assert_array_equal(sliced[a_key], g[a_key][:3])
    assert truncate_for_site(g, 8, "exact", scale)[a_key] is not None
    np.testing.assert_array_equal(truncate_for_site(g, 8, "exact", scale)[a_key], g[a_key])
    with pytest.raises(ValueError):
        truncate_for_site(g, 9, "exact", scale)


def test_product_space_roundtrip_keys():
    rng = np.random.default_rng(7)
    s = lora_state(rng, 4)
    p = to_product_space(s)
    assert [k for k in p if k.endswith(".lora_BA")] == [x.product_key for x in lora_pairs(list(s))]
    assert "base_model.model.classifier.bias" in p


def test_lonely_lora_key_is_rejected():
    rng = np.random.default_rng(8)
    s = lora_state(rng, 4, layers=1)
    s.pop(next(k for k in s if ".lora_B." in k))
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs(list(s))


def test_ffa_with_a_real_peft_model_never_sends_a_and_a_never_changes():
    """FFA: lora_A frozen from a shared seed; only B (and the head) train and travel."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(12, 12)
            self.classifier = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.classifier(torch.relu(self.query(x)))

    def site_model(seed):
        torch.manual_seed(0)   # the shared seed: every site builds the same A
        m = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                             modules_to_save=["classifier"]))
        for n, p in m.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
        torch.manual_seed(seed)
        return m

    models = [site_model(s) for s in (1, 2)]
    a0 = [dict((n, p.detach().clone()) for n, p in m.named_parameters() if "lora_A" in n) for m in models]
    assert all(torch.equal(a0[0][k], a0[1][k]) for k in a0[0])
    updates = []
    for seed, m in zip((1, 2), models):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        updates.append(get_trainable_state(m))
    for u in updates:
        assert not any(".lora_A." in k for k in u)
        assert any(".lora_B." in k for k in u)
    for m, a in zip(models, a0):
        for n, p in m.named_parameters():
            if "lora_A" in n:
                assert torch.equal(p, a[n])
    # with A shared, averaging B is exactly averaging the updates B_i A
    agg = naive_aggregate(updates, [1, 1])
    a = next(iter(a0[0].values())).numpy()
    b_key = next(k for k in agg if ".lora_B." in k)
    np.testing.assert_allclose(agg[b_key] @ a, 0.5 * (updates[0][b_key] @ a + updates[1][b_key] @ a), rtol=1e-5, atol=1e-7)


def test_split_personal_modes():
    rng = np.random.default_rng(9)
    s = lora_state(rng, 4)
    shared, personal = split_personal(s, "")
    assert personal == set() and shared == set(s)
    shared, personal = split_personal(s, "head")
    assert personal == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert shared == {k for k in s if "lora_" in k}
    shared, personal = split_personal(s, "lora_B")
    assert personal == {k for k in s if ".lora_B." in k}
    assert shared.isdisjoint(personal) and shared | personal == set(s)
    with pytest.raises(ConfigError):
        split_personal({"linear.weight": np.zeros(2)}, "head")
    with pytest.raises(ConfigError):
        split_personal(s, "everything")


def test_state_for_site_rank_uses_the_run_config():
    from fedcare.config import RunConfig
    from fedcare.strategies.hetero import rank_scale, state_for_site_rank

    rng = np.random.default_rng(10)
    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.aggregation = 8, 16, "exact"
    g = lora_state(rng, 8)
    site = state_for_site_rank(g, 4, cfg)
    assert lora_rank(site) == 4
    np.testing.assert_allclose(effective_deltas(site, rank_scale(cfg))[PFX.format(i=0)].shape, (10, 12))
    assert state_for_site_rank(g, None, cfg) == g and state_for_site_rank(g, 8, cfg) == g
    cfg.lora.aggregation = "ffa"
    with pytest.raises(ValueError, match="one rank at every site"):
        state_for_site_rank(g, 4, cfg)


def test_unfilled_components_stay_trainable():
    """B = 0 (LoRA's start) or a product of lower rank than the target: the spare
    components get B = 0 and a non-zero A, so they can still learn; the product is exact."""
    rng = np.random.default_rng(11)
    g = lora_state(rng, 8, head=False)
    for k in g:
        if ".lora_B." in k:
            g[k] = np.zeros_like(g[k])
    site = truncate_for_site(g, 2, "exact")
    for k, v in site.items():
        if ".lora_A." in k:
            assert np.all(np.linalg.norm(v, axis=1) > 0.1)       # alive
        else:
            assert np.all(v == 0)                                # product still zero
    low = lora_state(rng, 2, head=False)
    res = exact_aggregate([low], [1], rank=8)
    a_key = next(k for k in res.state if ".lora_A." in k)
    assert np.all(np.linalg.norm(res.state[a_key], axis=1) > 0.1)
    for k, d in effective_deltas(low).items():
        assert rel(effective_deltas(res.state)[k], d) < 1e-6
    assert res.rel_error < 1e-7
