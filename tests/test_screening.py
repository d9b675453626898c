"""Update screening: structure (keys, shapes, dtypes, finite values) and the norm bound."""
from __future__ import annotations

import numpy as np

from fedcare.strategies.screening import expected_from_state, screen_updates

A = "m.layer.0.query.lora_A.default.weight"
B = "m.layer.0.query.lora_B.default.weight"
HEAD = "m.classifier.weight"


def global_state():
    rng = np.random.default_rng(0)
    return {A: rng.normal(size=(8, 16)).astype(np.float32),
            B: np.zeros((12, 8), np.float32),
            HEAD: rng.normal(size=(5, 12)).astype(np.float32)}


def honest(g, seed, size=0.01):
    rng = np.random.default_rng(seed)
    return {k: (v + size * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}


def test_valid_updates_pass():
    g = global_state()
    replies = [(f"site-{i}", honest(g, i), 10 + i) for i in range(4)]
    accepted, rejected = screen_updates(expected_from_state(g), replies, norm_factor=5.0, global_state=g)
    assert accepted == ["site-0", "site-1", "site-2", "site-3"] and rejected == {}


def test_each_structural_fault_is_rejected_with_its_reason():
    g = global_state()
    exp = expected_from_state(g)
    missing = honest(g, 1); missing.pop(B)
    extra = honest(g, 2); extra["m.evil.weight"] = np.zeros(3, np.float32)
    shape = honest(g, 3); shape[HEAD] = np.zeros((5, 13), np.float32)
    dtype = honest(g, 4); dtype[HEAD] = dtype[HEAD].astype(np.float64)
    nan = honest(g, 5); nan[A][0, 0] = np.nan
    inf = honest(g, 6); inf[B][1, 1] = -np.inf
    replies = [("ok", honest(g, 0), 10), ("missing", missing, 10), ("extra", extra, 10),
               ("shape", shape, 10), ("dtype", dtype, 10), ("nan", nan, 10), ("inf", inf, 10),
               ("zero", honest(g, 7), 0)]
    accepted, rejected = screen_updates(exp, replies, norm_factor=0.0)
    assert accepted == ["ok"]
    assert rejected["missing"] == f"missing key {B}"
    assert rejected["extra"] == "unexpected key m.evil.weight"
    assert rejected["shape"] == f"shape (5, 13) != (5, 12) for {HEAD}"
    assert rejected["dtype"] == f"dtype float64 != float32 for {HEAD}"
    assert rejected["nan"] == f"non-finite values in {A}"
    assert rejected["inf"] == f"non-finite values in {B}"
    assert "num_examples" in rejected["zero"]


def test_norm_outlier_is_rejected_relative_to_round_median():
    g = global_state()
    exp = expected_from_state(g)
    replies = [(f"site-{i}", honest(g, i), 10) for i in range(4)]
    scaled = {k: (g[k] + 100 * (v - g[k])).astype(np.float32) for k, v in honest(g, 9).items()}
    replies.append(("hostile", scaled, 10))
    accepted, rejected = screen_updates(exp, replies, norm_factor=5.0, global_state=g)
    assert accepted == ["site-0", "site-1", "site-2", "site-3"]
    assert list(rejected) == ["hostile"]
    assert rejected["hostile"].startswith("update norm ") and "> 5 x round median" in rejected["hostile"]
    # with the bound off, the same update passes (it is structurally valid)
    accepted, rejected = screen_updates(exp, replies, norm_factor=0.0, global_state=g)
    assert "hostile" in accepted and rejected == {}


def test_norm_bound_needs_three_updates():
    g = global_state()
    replies = [("a", honest(g, 0), 10), ("b", honest(g, 1, size=10.0), 10)]
    accepted, _ = screen_updates(expected_from_state(g), replies, norm_factor=2.0, global_state=g)
    assert accepted == ["a", "b"]


def test_lower_rank_lora_allowed_only_when_asked():
    g = global_state()
    exp = expected_from_state(g)
    low = honest(g, 1)
    low[A], low[B] = low[A][:4].copy(), low[B][:, :4].copy()
    accepted, rejected = screen_updates(exp, [("low", low, 10)], 0.0)
    assert rejected["low"] == f"shape (4, 16) != (8, 16) for {A}"
    accepted, rejected = screen_updates(exp, [("low", low, 10)], 0.0, allow_lower_rank=True)
    assert accepted == ["low"]
    bad = dict(low)
    bad[A] = low[A][:, :8].copy()   # wrong non-rank dimension is still a wrong shape
    _, rejected = screen_updates(exp, [("bad", bad, 10)], 0.0, allow_lower_rank=True)
    assert rejected["bad"].startswith("shape (4, 8)")


def test_duplicate_site_reply_is_rejected():
    g = global_state()
    replies = [("a", honest(g, 0), 10), ("a", honest(g, 1), 10), ("b", honest(g, 2), 10)]
    accepted, rejected = screen_updates(expected_from_state(g), replies, 0.0)
    assert accepted == ["b"] and "duplicate" in rejected["a"]
