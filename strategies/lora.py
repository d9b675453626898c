"""LoRA aggregation math on plain ``name -> ndarray`` states (no Flower, no I/O).

peft names a LoRA layer's factors ``<prefix>.lora_A.<adapter>.weight`` with shape
``[r, in]`` (conv: ``[r, in, k, k]``) and ``<prefix>.lora_B.<adapter>.weight`` with
shape ``[out, r]`` (conv: ``[out, r, 1, 1]``); the layer's update is
``scale * B @ A`` with ``scale = alpha / r``. Conv factors are flattened to matrices.

- ``naive``: average A and B separately; ``mean(B) mean(A) != mean(B A)`` in general.
- ``exact``: average the products ``B_i A_i`` and re-factorise the mean to rank r with
  a truncated SVD (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``); the relative
  Frobenius truncation error is returned so the run can record it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

LORA_A = ".lora_A."
LORA_B = ".lora_B."
PRODUCT_SUFFIX = ".lora_BA"   # key of a layer's product in "product space"
#: singular values below this fraction of the largest are treated as zero
NULL_SINGULAR_VALUE = 1e-10

State = Mapping[str, np.ndarray]
#: rank -> LoRA scale (peft: alpha / r). ``None`` means every rank has the same scale.
RankScale = Callable[[int], float] | None


def is_lora_a(key: str) -> bool:
    return LORA_A in key


def is_lora_b(key: str) -> bool:
    return LORA_B in key


def is_lora_key(key: str) -> bool:
    return is_lora_a(key) or is_lora_b(key)


@dataclass(frozen=True)
class LoraPair:
    prefix: str      # module path, e.g. "base_model.model.bert.encoder.layer.0.attention.self.query"
    a_key: str
    b_key: str

    @property
    def product_key(self) -> str:
        return self.prefix + PRODUCT_SUFFIX


def lora_pairs(keys: Sequence[str]) -> list[LoraPair]:
    """The (A, B) key pairs among ``keys``, in the order their A keys appear.
    Raises ``ValueError`` if an A has no matching B (or the reverse)."""
    keyset = set(keys)
    pairs = []
    for k in keys:
        if is_lora_a(k):
            b = k.replace(LORA_A, LORA_B, 1)
            if b not in keyset:
                raise ValueError(f"LoRA key {k} has no matching {b}")
            pairs.append(LoraPair(k.split(LORA_A, 1)[0], k, b))
    paired_b = {p.b_key for p in pairs}
    lonely = [k for k in keys if is_lora_b(k) and k not in paired_b]
    if lonely and pairs:
        raise ValueError(f"LoRA key {lonely[0]} has no matching lora_A key")
    return pairs


def lora_rank(state: State) -> int | None:
    """Rank of the first LoRA layer (rows of A, or columns of B when A is absent)."""
    for k, v in state.items():
        if is_lora_a(k):
            return int(np.shape(v)[0])
    for k, v in state.items():
        if is_lora_b(k):
            return int(np.shape(v)[1])
    return None


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``B @ A`` as a float64 matrix ``[out, in * k * k]``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    r = a.shape[0]
    if b.shape[1] != r:
        raise ValueError(f"rank mismatch: A has {r} rows, B has {b.shape[1]} columns")
    return b.reshape(b.shape[0], r) @ a.reshape(r, -1)


def factorise(w: np.ndarray, rank: int, a_tail: tuple[int, ...], b_tail: tuple[int, ...]
              ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Truncated SVD of ``w`` ``[out, in']`` to ``rank``: returns (A, B, lost, total) with
    A shaped ``[rank, *a_tail]``, B ``[out, rank, *b_tail]`` and the squared Frobenius
    norms of the discarded part and of ``w`` (relative error = sqrt(lost / total)).
    Components the product does not fill (zero singular values, e.g. B = 0 at the start,
    or a rank above ``min(out, in')``) get B = 0 and a non-zero A row, as LoRA's own
    initialisation: the product is unchanged, but the component can still learn (with
    A = 0 and B = 0 both gradients would be zero and it would stay dead)."""
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    k = min(rank, s.shape[0])
    live = int(np.sum(s[:k] > NULL_SINGULAR_VALUE * max(float(s[0]) if s.size else 0.0, 1e-300)))
    root = np.sqrt(s[:live])
    b = np.zeros((w.shape[0], rank))
    a = np.zeros((rank, w.shape[1]))
    b[:, :live] = u[:, :live] * root
    a[:live] = root[:, None] * vt[:live]
    # dormant components: unit directions orthogonal to the live ones, at peft's init
    # scale (kaiming-uniform rows have norm ~ 1/sqrt(3))
    a[live:k] = vt[live:k] / np.sqrt(3.0)
    if rank > k:
        extra = np.random.default_rng(rank).normal(size=(rank - k, w.shape[1]))
        a[k:] = extra / np.linalg.norm(extra, axis=1, keepdims=True) / np.sqrt(3.0)
    lost = float(np.sum(s[live:] ** 2))
    total = float(np.sum(s ** 2))
    return a.reshape((rank, *a_tail)), b.reshape((w.shape[0], rank, *b_tail)), lost, total


def product_space_keys(keys: Sequence[str]) -> list[str]:
    """The keys ``to_product_space`` gives a state with ``keys``, in its order."""
    pairs = lora_pairs(keys)
    prefix_of = {p.a_key: p.product_key for p in pairs} | {p.b_key: p.product_key for p in pairs}
    return list(dict.fromkeys(prefix_of.get(k, k) for k in keys))


def to_product_space(state: State, scale: RankScale = None) -> dict[str, np.ndarray]:
    """Replace each (A, B) pair by the (scaled) product ``scale(r) * B @ A`` under
    ``<prefix>.lora_BA``, in place of the pair's first key; other keys pass unchanged."""
    pairs = {p.a_key: p for p in lora_pairs(list(state))}
    by_b = {p.b_key: p for p in pairs.values()}
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        pair = pairs.get(k) or by_b.get(k)
        if pair is None:
            out[k] = np.asarray(v)
        elif pair.product_key not in out:
            a, b = state[pair.a_key], state[pair.b_key]
            p = product(a, b)
            out[pair.product_key] = p * (scale(a.shape[0]) if scale else 1.0)
    return out


@dataclass
class Refactorised:
    state: dict[str, np.ndarray]
    rel_error: float          # sqrt(sum of lost energy / total energy) over all layers
    max_layer_rel_error: float


def from_product_space(pstate: State, template: State, rank: int,
                       scale: RankScale = None) -> Refactorised:
    """Inverse of ``to_product_space``: factorise every product back to (A, B) of
    ``rank`` with the key order, dtypes and non-rank dimensions of ``template``."""
    pairs = lora_pairs(list(template))
    by_key = {p.a_key: p for p in pairs} | {p.b_key: p for p in pairs}
    out: dict[str, np.ndarray] = {}
    lost_sum = total_sum = 0.0
    worst = 0.0
    for k, t in template.items():
        pair = by_key.get(k)
        if pair is None:
            out[k] = np.asarray(pstate[k]).astype(np.asarray(t).dtype, copy=False)
            continue
        if pair.a_key in out:
            continue
        ta, tb = np.asarray(template[pair.a_key]), np.asarray(template[pair.b_key])
        w = np.asarray(pstate[pair.product_key], dtype=np.float64)
        if scale:
            w = w / scale(rank)
        a, b, lost, total = factorise(w, rank, ta.shape[1:], tb.shape[2:])
        out[pair.a_key] = a.astype(ta.dtype)
        out[pair.b_key] = b.astype(tb.dtype)
        lost_sum, total_sum = lost_sum + lost, total_sum + total
        if total > 0:
            worst = max(worst, float(np.sqrt(lost / total)))
    ordered = {k: out[k] for k in template}
    rel = float(np.sqrt(lost_sum / total_sum)) if total_sum > 0 else 0.0
    return Refactorised(ordered, rel, worst)


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Key-wise weighted mean (float64) of states with identical keys and shapes."""
    w = np.asarray(weights, dtype=np.float64)
    if len(states) == 0 or w.sum() <= 0:
        raise ValueError("need at least one state with positive weight")
    w = w / w.sum()
    return {k: sum(wi * np.asarray(s[k], dtype=np.float64) for wi, s in zip(w, states))
            for k in states[0]}


def exact_aggregate(states: Sequence[State], weights: Sequence[float], rank: int,
                    template: State | None = None, scale: RankScale = None) -> Refactorised:
    """Weighted mean of the products ``B_i A_i`` (non-LoRA keys: weighted mean),
    re-factorised to ``rank``. States may have different ranks (heterogeneous sites)."""
    template = template if template is not None else states[0]
    mean = weighted_mean([to_product_space(s, scale) for s in states], weights)
    return from_product_space(mean, template, rank, scale)


def naive_aggregate(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg on the factors: A and B averaged separately (same ranks required)."""
    mean = weighted_mean(states, weights)
    return {k: mean[k].astype(np.asarray(states[0][k]).dtype) for k in states[0]}


def effective_deltas(state: State, scale: RankScale = None) -> dict[str, np.ndarray]:
    """Per-layer ``scale * B @ A`` keyed by the layer prefix (for tests and diagnostics)."""
    return {p.prefix: product(state[p.a_key], state[p.b_key]) * (scale(np.shape(state[p.a_key])[0]) if scale else 1.0)
            for p in lora_pairs(list(state))}
