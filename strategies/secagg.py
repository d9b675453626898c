"""The coordinator's side of secure aggregation: routing and unmasking, no I/O.

``Coordinator`` is built from the mask and channel public keys the sites advertised
(U1, in node order = index order), routes the sealed shares (U2: the sites that shared),
takes the masked inputs (U3: the survivors) and, from the shares the survivors reveal,
removes the survivors' self-masks and the pairwise masks of sites that dropped after
sharing. What it ends with is the sum of the survivors' inputs and nothing else: no
site's input is ever unmasked on its own.

A run with secure aggregation is a weighted mean of the sites' clipped updates; rules
that need every update (Krum, FedMedian, trimmed mean, exact SVD LoRA aggregation,
norm screening, server-side client-level DP) are refused by ``check_secagg_config``.
"""
from __future__ import annotations

import numpy as np

from fedcare import secagg as SA
from fedcare.errors import ConfigError

from .rules import MEAN_STRATEGIES


class SecAggFailed(Exception):
    """The round cannot be unmasked (too few shares); the global model stays as it was."""


NEED_INDIVIDUAL = {
    "krum": "Krum picks the most central single update",
    "fedmedian": "FedMedian takes a coordinate-wise median of the updates",
    "trimmedavg": "a trimmed mean sorts the updates coordinate by coordinate",
    "fedadam": "FedAdam is supported only as FedAvg under secure aggregation in this version",
    "fedyogi": "FedYogi is supported only as FedAvg under secure aggregation in this version",
    "qfedavg": "q-FedAvg weights each update by its own loss and norm",
}


def check_secagg_config(cfg, n_sites: int, dim: int = 1) -> None:
    """One-line ConfigError when the run asks secure aggregation with a rule that needs
    the individual updates, or parameters under which it would be unsafe."""
    if not cfg.secagg.enabled:
        return
    name = cfg.strategy.name
    if name not in MEAN_STRATEGIES:
        why = NEED_INDIVIDUAL.get(name, "it is not a weighted mean")
        raise ConfigError(f"secagg.enabled needs strategy fedavg or fedprox: {why}, which the "
                          "coordinator cannot compute from the sum alone")
    if cfg.lora.aggregation == "exact":
        raise ConfigError("secagg.enabled cannot use lora.aggregation=exact: the SVD of each site's "
                          "product needs the individual updates; use naive or ffa")
    if cfg.strategy.screen_norm_factor > 0:
        raise ConfigError("secagg.enabled cannot screen updates by norm at the server (it never sees "
                          "one); each site's clipping to secagg.clip bounds its contribution instead")
    if cfg.dp.level == "client":
        raise ConfigError("secagg.enabled replaces server-side client-level DP: use secagg.epsilon "
                          "(distributed DP, noise added at the sites) instead of dp.level=client")
    SA.check_params(SA.params_of(cfg, n_sites, dim), n_sites)


class Coordinator:
    def __init__(self, params: SA.Params, round_key: bytes, keys: dict[int, tuple[bytes, bytes]]) -> None:
        self.params, self.round_key = params, round_key
        self.nodes = sorted(keys)                       # index i is self.nodes[i]
        self.n = len(self.nodes)
        self.pk = {i: keys[node] for i, node in enumerate(self.nodes)}
        self.degree = min(params.degree, max(self.n - 1, 1))
        self.graph = {i: SA.neighbours(i, self.n, self.degree) for i in range(self.n)}
        self.delivered: dict[int, set[int]] = {}        # i -> sites whose shares i received (U2)
        self.masked: dict[int, np.ndarray] = {}         # i -> masked input (U3)

    def index_of(self, node: int) -> int:
        return self.nodes.index(node)

    def key_request(self, node: int) -> tuple[int, int, dict[int, tuple[bytes, bytes]]]:
        i = self.index_of(node)
        return i, self.n, {j: self.pk[j] for j in self.graph[i]}

    def route_shares(self, sent: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """node -> {neighbour index: sealed}  =>  node -> {sender index: sealed} for it."""
        shared = {self.index_of(node): out for node, out in sent.items()
                  if set(out) == set(self.graph[self.index_of(node)])}
        inbox: dict[int, dict[int, bytes]] = {i: {} for i in shared}
        for src, out in shared.items():
            for dst, sealed in out.items():
                if dst in inbox:
                    inbox[dst][src] = sealed
        self.delivered = {i: set(got) for i, got in inbox.items()}
        return {self.nodes[i]: got for i, got in inbox.items()}

    def collect_masked(self, masked: dict[int, np.ndarray]) -> list[int]:
        """Keep the masked inputs of sites that shared; the survivors' nodes."""
        self.masked = {self.index_of(node): np.asarray(y, dtype=np.uint32) for node, y in masked.items()
                       if self.index_of(node) in self.delivered}
        return [self.nodes[i] for i in sorted(self.masked)]

    def unmask_request(self, node: int) -> tuple[list[int], list[int], int]:
        """(surviving neighbours, neighbours dropped after sharing, sites in the sum)."""
        got = self.delivered.get(self.index_of(node), set())
        return sorted(got & set(self.masked)), sorted(got - set(self.masked)), len(self.masked)

    def unmask(self, revealed: dict[int, dict[str, dict[int, bytes]]]) -> np.ndarray:
        """The sum of the survivors' inputs (uint32) from the shares the survivors revealed."""
        size = next(iter(self.masked.values())).size
        total = np.zeros(size, dtype=np.uint32)
        for y in self.masked.values():
            total = total + y
        b_shares: dict[int, list[bytes]] = {}
        s_shares: dict[int, list[bytes]] = {}
        for node, shares in revealed.items():
            if self.index_of(node) not in self.masked:
                continue
            for j, sh in shares.get("b", {}).items():
                b_shares.setdefault(j, []).append(sh)
            for j, sh in shares.get("s", {}).items():
                s_shares.setdefault(j, []).append(sh)
        for j in self.masked:
            total = total - SA.prg(self._combine(b_shares.get(j, []), j, "self-mask"), size)
        for j in sorted(set(self.delivered) - set(self.masked)):
            holders = [i for i in self.masked if j in self.delivered[i]]
            if not holders:
                continue
            s_sk = self._combine(s_shares.get(j, []), j, "mask key")
            if SA.public_bytes_of(s_sk) != self.pk[j][1]:
                raise SecAggFailed(f"the mask key of dropped site {j} does not match its public key")
            for i in holders:   # i added sign(i, j) * PRG(s_ij); take it out
                mask = SA.prg(SA.agree(s_sk, self.pk[i][1], SA.mask_info(self.round_key)), size)
                total = total - mask if SA.pair_sign(i, j) > 0 else total + mask
        return total.astype(np.uint32)

    def _combine(self, shares: list[bytes], j: int, what: str) -> bytes:
        if len(shares) < self.params.threshold:
            raise SecAggFailed(f"{len(shares)} shares of site {j}'s {what}, fewer than the threshold "
                               f"{self.params.threshold}")
        try:
            return SA.combine(shares[: self.params.threshold])
        except ValueError:
            raise SecAggFailed(f"the shares of site {j}'s {what} do not combine") from None
