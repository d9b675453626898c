"""A site's side of secure aggregation (fedcare/secagg.py has the arithmetic).

One ``SiteSession`` per round, kept in the ClientApp's context between the messages:

1. ``advertise``: after training, the encoded input is kept here; two X25519 key pairs
   (channel, mask) are made; only the public keys leave.
2. ``share_keys``: given its index and its neighbours' public keys, the site Shamir-shares
   its self-mask seed and its mask key among the neighbours, each pair of shares sealed
   (AES-GCM) for the neighbour it is meant for.
3. ``mask``: given the shares sealed for it, the site sends its input masked.
4. ``unmask``: the site reveals, for each neighbour, the self-mask share if the server
   says it survived or the mask-key share if it says it dropped, never both for one
   neighbour; it refuses when fewer sites are in the sum than its policy or the run's
   noise calibration allows, or fewer of its neighbours than the threshold survived.
"""
from __future__ import annotations

import json
import os

import numpy as np
from cryptography.exceptions import InvalidTag

from fedcare import secagg as SA
from fedcare.errors import PolicyRefusal


def refuse(reason: str) -> None:
    raise PolicyRefusal(f"secure aggregation: {reason}")


class SiteSession:
    def __init__(self, params: SA.Params, round_key: bytes, min_in_sum: int = 0) -> None:
        self.params, self.round_key = params, round_key
        self.min_in_sum = max(min_in_sum, params.min_in_sum)
        self.stage = "new"
        self.index = -1
        self.n = 0
        self.input = np.zeros(0, dtype=np.uint32)
        self.c_sk = self.s_sk = self.b = b""
        self.keys: dict[int, tuple[bytes, bytes]] = {}        # neighbour -> (channel pk, mask pk)
        self.held: dict[int, tuple[bytes, bytes]] = {}        # neighbour -> (its b share, its s share)
        self.revealed: dict[int, str] = {}                     # neighbour -> "b" | "s"

    # ---------------------------------------------------------------- stages
    def advertise(self, encoded_input: np.ndarray) -> tuple[bytes, bytes]:
        self._expect("new")
        self.input = np.asarray(encoded_input, dtype=np.uint32)
        c, s = SA.new_key(), SA.new_key()
        self.c_sk, self.s_sk, self.b = SA.private_bytes(c), SA.private_bytes(s), os.urandom(SA.KEY_BYTES)
        self.stage = "advertised"
        return SA.public_bytes(c), SA.public_bytes(s)

    def share_keys(self, index: int, n: int, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        self._expect("advertised")
        p = self.params
        if not 0 <= index < n:
            refuse(f"index {index} is outside the {n} sites")
        if n < self.min_in_sum:
            refuse(f"{n} sites in the round, fewer than the {self.min_in_sum} a sum must hold")
        graph = set(SA.neighbours(index, n, min(p.degree, n - 1)))
        if set(keys) != graph:
            refuse("the neighbours sent are not this site's neighbours in the round's graph")
        if len(keys) < p.threshold:
            refuse(f"{len(keys)} neighbours, fewer than the threshold {p.threshold}")
        mine = {SA.public_bytes_of(self.c_sk), SA.public_bytes_of(self.s_sk)}
        if any(len(c) != SA.KEY_BYTES or len(s) != SA.KEY_BYTES or c in mine or s in mine
               for c, s in keys.values()):
            refuse("a neighbour's key is malformed or this site's own")
        self.index, self.n, self.keys = index, n, dict(keys)
        order = sorted(keys)
        b_shares = SA.share(self.b, p.threshold, len(order))
        s_shares = SA.share(self.s_sk, p.threshold, len(order))
        out = {}
        for j, bs, ss in zip(order, b_shares, s_shares):
            key = SA.agree(self.c_sk, keys[j][0], SA.channel_info(self.round_key))
            plain = len(bs).to_bytes(4, "little") + bs + ss
            out[j] = SA.seal(key, plain, SA.share_aad(self.round_key, index, j))
        self.stage = "shared"
        return out

    def mask(self, incoming: dict[int, bytes]) -> np.ndarray:
        self._expect("shared")
        if not set(incoming) <= set(self.keys):
            refuse("shares arrived from a site that is not a neighbour")
        if len(incoming) + 1 < self.params.threshold:
            refuse(f"shares from {len(incoming)} neighbours, too few for the threshold {self.params.threshold}")
        for j, sealed in incoming.items():
            key = SA.agree(self.c_sk, self.keys[j][0], SA.channel_info(self.round_key))
            try:
                plain = SA.unseal(key, sealed, SA.share_aad(self.round_key, j, self.index))
            except InvalidTag:
                refuse(f"the shares from site {j} do not authenticate")
            cut = 4 + int.from_bytes(plain[:4], "little")
            self.held[j] = (plain[4:cut], plain[cut:])
        size = self.input.size
        y = self.input + SA.prg(self.b, size)
        for j in sorted(self.held):   # the pairwise masks of the neighbours that shared
            mask = SA.prg(SA.agree(self.s_sk, self.keys[j][1], SA.mask_info(self.round_key)), size)
            y = y + mask if SA.pair_sign(self.index, j) > 0 else y - mask
        self.stage = "masked"
        self.input = np.zeros(0, dtype=np.uint32)   # the plain input is not kept past masking
        return y.astype(np.uint32)

    def unmask(self, survivors: list[int], dropped: list[int], n_in_sum: int) -> dict[str, dict[int, bytes]]:
        if self.stage not in ("masked", "unmasked"):
            refuse(f"unmasking asked at stage {self.stage}")
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            refuse("a neighbour is reported both surviving and dropped (both its secrets asked)")
        for j in surv:
            if self.revealed.get(j, "b") != "b":
                refuse(f"site {j}'s mask-key share was revealed; its self-mask share is refused")
        for j in drop:
            if self.revealed.get(j, "s") != "s":
                refuse(f"site {j}'s self-mask share was revealed; its mask-key share is refused")
        if not (surv | drop) <= set(self.held):
            refuse("shares asked for a site that shared none with this site")
        if n_in_sum < self.min_in_sum:
            refuse(f"{n_in_sum} sites in the sum, fewer than the {self.min_in_sum} required")
        if len(surv) + 1 < self.params.threshold:
            refuse(f"{len(surv)} of this site's neighbours survived, fewer than the threshold")
        self.revealed.update({j: "b" for j in surv} | {j: "s" for j in drop})
        self.stage = "unmasked"
        return {"b": {j: self.held[j][0] for j in surv}, "s": {j: self.held[j][1] for j in drop}}

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            refuse(f"a {stage} step asked at stage {self.stage}")

    # ------------------------------------------------------ kept between messages
    def to_json(self) -> str:
        hexs = {k: getattr(self, k).hex() for k in ("c_sk", "s_sk", "b", "round_key")}
        return json.dumps({
            **hexs, "params": self.params.to_dict(), "min_in_sum": self.min_in_sum, "stage": self.stage,
            "index": self.index, "n": self.n, "input": self.input.tobytes().hex(),
            "keys": {str(j): [c.hex(), s.hex()] for j, (c, s) in self.keys.items()},
            "held": {str(j): [b.hex(), s.hex()] for j, (b, s) in self.held.items()},
            "revealed": {str(j): v for j, v in self.revealed.items()},
        })

    @classmethod
    def from_json(cls, text: str) -> "SiteSession":
        d = json.loads(text)
        s = cls(SA.Params(**d["params"]), bytes.fromhex(d["round_key"]), d["min_in_sum"])
        s.c_sk, s.s_sk, s.b = (bytes.fromhex(d[k]) for k in ("c_sk", "s_sk", "b"))
        s.stage, s.index, s.n = d["stage"], d["index"], d["n"]
        s.input = np.frombuffer(bytes.fromhex(d["input"]), dtype=np.uint32).copy()
        s.keys = {int(j): (bytes.fromhex(c), bytes.fromhex(k)) for j, (c, k) in d["keys"].items()}
        s.held = {int(j): (bytes.fromhex(b), bytes.fromhex(k)) for j, (b, k) in d["held"].items()}
        s.revealed = {int(j): v for j, v in d["revealed"].items()}
        return s
