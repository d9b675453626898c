"""Secure aggregation (SecAgg+, Bell et al. 2020): the arithmetic both sides share.

A site's update becomes one vector of integers modulo 2^32: the update is clipped in L2
norm to ``clip``, scaled by ``scale = (2^(bits-1) - 1) / clip``, stochastically rounded
(unbiased), multiplied by the site's integer weight, and the weight appended as the last
coordinate. Optionally Skellam noise is added (distributed DP). The vector is then
masked: ``y_i = x_i + PRG(b_i) + sum_j sign(i, j) PRG(s_ij)`` where ``b_i`` is the
site's self-mask seed and ``s_ij`` the X25519 agreement between the mask keys of sites
i and j, neighbours in a k-regular Harary graph. The pairwise masks cancel in the sum;
the self-masks and the masks of sites that dropped after sharing are removed with
Shamir shares (threshold ``t > k/2``) held by neighbours.

flwr 1.41's ``flwr.common.secure_aggregation`` was read first: its Shamir sharing
(pycryptodome, GF(2^128) per 16-byte chunk) is sound but slow (pure-Python field
arithmetic and a thread pool per call: 4.6 s of unmasking at 50 sites), so sharing is
over the prime field GF(2^521 - 1) with Python integers here; its quantizer
(numpy's global RNG, ``int32`` cast, an offset of ``clip`` that the sum must undo) and
its mask generator (``RandomState`` seeded with 32 bits XOR-folded from the seed,
``randint(0, range-1)`` never draws the top value) are not, so masks come from ChaCha20
and quantization is symmetric around zero here.

Quantization error of the weighted mean: each coordinate's rounding error is below
``1 / scale`` and the weighted mean of errors is too, so a dequantized mean differs from
the float weighted mean of the (clipped) updates by less than ``clip / (2^(bits-1) - 1)``
per coordinate, and is unbiased.
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets
from dataclasses import asdict, dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .accounting import secagg_noise_mu
from .errors import ConfigError

RECORD = "secagg"      # the ConfigRecord of a secure-aggregation message and reply
SHARE, MASK, UNMASK = "secagg_share", "secagg_mask", "secagg_unmask"   # train.<step> message types
STEPS = (SHARE, MASK, UNMASK)
MASKED = "masked"      # the ArrayRecord key of a masked input
MOD = 2 ** 32
HALF = 2 ** 31
KEY_BYTES = 32
SHAMIR_P = 2 ** 521 - 1          # a Mersenne prime above every 32-byte secret
SHARE_VALUE_BYTES = 66


@dataclass(frozen=True)
class Params:
    """One round's protocol parameters, from the run configuration (never from a message)."""

    clip: float          # L2 norm each site's update is clipped to
    bits: int            # quantization bits per coordinate (signed)
    degree: int          # neighbours per site in the Harary graph
    threshold: int       # shares needed to reconstruct a secret; > degree / 2
    weight_cap: int      # a site's integer weight is min(examples, weight_cap); 1 under DP
    noise_mu: float      # Skellam parameter per site (each coordinate: Poisson(mu) - Poisson(mu))
    min_in_sum: int      # fewest sites a released sum may hold (the noise is calibrated to it)

    @property
    def scale(self) -> float:
        return (2 ** (self.bits - 1) - 1) / self.clip

    def to_dict(self) -> dict:
        return asdict(self)


def auto_degree(n: int) -> int:
    """Neighbours per site: every other site up to 16 sites, else an even degree
    ~4 log2(n), so a site's cost grows as log n."""
    if n <= 16:
        return max(n - 1, 1)
    k = 2 * math.ceil(2 * math.log2(n))
    return min(n - 1, k)


def check_params(p: Params, n_sites: int) -> None:
    """Raise ConfigError for parameters under which the protocol is unsafe or overflows."""
    if p.clip <= 0:
        raise ConfigError("secagg.clip must be > 0")
    if not 2 <= p.bits <= 24:
        raise ConfigError("secagg.bits must be in [2, 24]")
    if p.degree < 1 or p.degree > max(n_sites - 1, 1):
        raise ConfigError(f"secagg.degree {p.degree} must be in [1, sites-1={n_sites - 1}]")
    if p.degree < n_sites - 1 and p.degree % 2:
        raise ConfigError("secagg.degree must be even (a Harary graph) unless every site is a neighbour")
    if not p.degree / 2 < p.threshold <= p.degree:
        raise ConfigError(f"secagg.threshold {p.threshold} must be above half the degree ({p.degree}) "
                          "and at most the degree: otherwise two disjoint groups of neighbours could be "
                          "asked for both secrets of one site")
    peak = n_sites * p.weight_cap * (2 ** (p.bits - 1)) + 10 * math.sqrt(2 * p.noise_mu * n_sites)
    if peak >= HALF:
        raise ConfigError(f"secagg: {n_sites} sites x weight cap {p.weight_cap} x 2^{p.bits - 1} "
                          "overflows 32-bit sums; lower secagg.bits or secagg.weight_cap")


def params_of(cfg, n_sites: int, dim: int) -> Params:
    """The protocol parameters a run implies for ``n_sites`` sites and updates of ``dim``
    numbers (the same at the coordinator and every site)."""
    s = cfg.secagg
    degree = s.degree or auto_degree(n_sites)
    threshold = s.threshold or degree // 2 + 1
    min_in_sum = max(cfg.strategy.min_sites, s.min_sites_in_sum, 1)
    dp = s.epsilon > 0 or s.noise_multiplier > 0
    p = Params(clip=s.clip, bits=s.bits, degree=degree, threshold=threshold,
               weight_cap=1 if dp else s.weight_cap, noise_mu=0.0, min_in_sum=min_in_sum)
    if not dp:
        return p
    mu = secagg_noise_mu(p, cfg, dim)
    return Params(**{**p.to_dict(), "noise_mu": mu})


def run_params(cfg, task, dim: int) -> Params:
    """``params_of`` for the run's sites (the task's fixed sites or ``cfg.sites``)."""
    return params_of(cfg, task.fixed_sites or cfg.sites, dim)


# ------------------------------------------------------------------------ graph
def neighbours(i: int, n: int, k: int) -> list[int]:
    """Site i's neighbours in the Harary graph H(k, n) on sites 0..n-1."""
    if k >= n - 1:
        return [j for j in range(n) if j != i]
    return sorted({(i + d) % n for d in range(1, k // 2 + 1)} | {(i - d) % n for d in range(1, k // 2 + 1)})


# ------------------------------------------------------------------------ vectors
def flatten(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys]) if keys \
        else np.zeros(0)


def unflatten(vec: np.ndarray, like: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for k in keys:
        ref = np.asarray(like[k])
        out[k] = vec[pos:pos + ref.size].reshape(ref.shape).astype(ref.dtype)
        pos += ref.size
    return out


def clip_l2(vec: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(vec))
    return vec * (clip / norm) if norm > clip else vec


def quantize(vec: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    """Clipped, scaled, stochastically rounded (E[q] = scale x): int64."""
    x = clip_l2(vec, p.clip) * p.scale
    low = np.floor(x)
    return (low + (rng.random(x.shape) < (x - low))).astype(np.int64)


def skellam(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    if mu <= 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def encode_input(delta: np.ndarray, weight: int, p: Params, rng: np.random.Generator) -> np.ndarray:
    """The site's input in the ring: weight x quantized update (+ noise), then the weight."""
    q = quantize(delta, p, rng) * int(weight) + skellam(p.noise_mu, delta.size, rng)
    return to_ring(np.append(q, int(weight)))


def to_ring(ints: np.ndarray) -> np.ndarray:
    return np.mod(np.asarray(ints, dtype=np.int64), MOD).astype(np.uint32)


def from_ring(vec: np.ndarray) -> np.ndarray:
    """Ring elements read as signed integers in [-2^31, 2^31)."""
    v = np.asarray(vec, dtype=np.uint32).astype(np.int64)
    return np.where(v >= HALF, v - MOD, v)


def decode_sum(total: np.ndarray, p: Params) -> tuple[np.ndarray, int]:
    """(weighted mean of the updates as floats, total weight) from the unmasked sum."""
    signed = from_ring(total)
    weight = int(signed[-1])
    if weight <= 0:
        raise ValueError("the unmasked sum carries no positive weight")
    return signed[:-1].astype(np.float64) / (p.scale * weight), weight


# ------------------------------------------------------------------------ crypto
def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint32 from ChaCha20 keyed by a 32-byte seed."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * size)), dtype="<u4").astype(np.uint32)


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_bytes_of(private: bytes) -> bytes:
    return public_bytes(X25519PrivateKey.from_private_bytes(private))


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends of an X25519 pair derive alike (HKDF-SHA256 over ``info``)."""
    key = private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
    secret = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def share(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret over GF(2^521 - 1): share x (1..num) is the 4-byte
    index x and the 66-byte value of a random polynomial of degree threshold - 1 at x."""
    if len(secret) != KEY_BYTES or not 1 <= threshold <= num:
        raise ValueError("share: a 32-byte secret and 1 <= threshold <= num")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(SHAMIR_P) for _ in range(threshold - 1)]
    out = []
    for x in range(1, num + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % SHAMIR_P
        out.append(x.to_bytes(4, "little") + y.to_bytes(SHARE_VALUE_BYTES, "big"))
    return out


def combine(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` distinct shares (Lagrange at 0); ValueError if they
    are malformed or repeat an index."""
    if any(len(s) != 4 + SHARE_VALUE_BYTES for s in shares):
        raise ValueError("a share has the wrong length")
    pts = [(int.from_bytes(s[:4], "little"), int.from_bytes(s[4:], "big")) for s in shares]
    if len({x for x, _ in pts}) != len(pts) or any(x == 0 for x, _ in pts):
        raise ValueError("share indices repeat or are 0")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num, den = num * -xj % SHAMIR_P, den * (xi - xj) % SHAMIR_P
        secret = (secret + yi * num * pow(den, -1, SHAMIR_P)) % SHAMIR_P
    if secret >> (8 * KEY_BYTES):
        raise ValueError("the shares do not combine to a 32-byte secret")
    return secret.to_bytes(KEY_BYTES, "big")


def pair_sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def round_key(run_id: str, rnd: int, nonce: str) -> bytes:
    """Binds every key agreement and sealed share to one run, round and nonce."""
    return hashlib.sha256(f"fedcare-secagg/{run_id}/{rnd}/{nonce}".encode()).digest()[:16]


def mask_info(round_key: bytes) -> bytes:
    return b"fedcare-secagg-mask/" + round_key


def channel_info(round_key: bytes) -> bytes:
    return b"fedcare-secagg-channel/" + round_key


def share_aad(round_key: bytes, src: int, dst: int) -> bytes:
    return round_key + src.to_bytes(4, "little") + dst.to_bytes(4, "little")
