"""The site's tamper-evident audit log: one JSON line per message that leaves the site.

Each entry carries ``seq`` (0, 1, 2...), ``prev`` (the previous entry's hash) and
``hash`` = sha256 of the entry's canonical JSON without ``hash``. Editing, deleting,
inserting or reordering an entry breaks the chain and ``verify`` reports where. A
side file ``<log>.head`` holds the newest seq and hash, so cutting entries off the
end is detected too (unless the head is rewritten as well: export the head hash,
e.g. print it with ``fedcare site audit``, to anchor it outside the site's disk).

Appends take an exclusive ``flock`` on the log, so several processes of the same
site (one per Flower message) can write safely.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from fedcare.errors import FedcareError

GENESIS = "0" * 64
FIELDS = ("seq", "time", "run_id", "round", "kind", "payload_sha256", "bytes", "epsilon",
          "policy_fingerprint", "decision", "reason", "prev")


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: entry.get(k) for k in FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    # ------------------------------------------------------------------ writing
    def append(self, run_id: str, round: int, kind: str, payload_sha256: str, nbytes: int,
               epsilon: float | None, policy_fingerprint: str, decision: str,
               reason: str = "") -> dict[str, Any]:
        """Append one entry (under an exclusive lock) and return it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                prev = _parse_last(_last_line(fh), self.path)
                entry: dict[str, Any] = {
                    "seq": prev["seq"] + 1 if prev else 0,
                    "time": time.time(),
                    "run_id": str(run_id),
                    "round": int(round),
                    "kind": str(kind),
                    "payload_sha256": str(payload_sha256),
                    "bytes": int(nbytes),
                    "epsilon": None if epsilon is None else float(epsilon),
                    "policy_fingerprint": str(policy_fingerprint or ""),
                    "decision": str(decision),
                    "reason": str(reason or ""),
                    "prev": prev["hash"] if prev else GENESIS,
                }
                entry["hash"] = entry_hash(entry)
                fh.write((json.dumps(entry, sort_keys=True) + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())
                self._write_head(entry)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return entry

    def _write_head(self, entry: dict[str, Any]) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n")
        os.replace(tmp, self.head_path)

    # ------------------------------------------------------------------ reading
    def entries(self) -> Iterator[dict[str, Any]]:
        """Entries in file order (unparseable lines come back as ``{"_raw": line}``)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for line in fh:
                text = line.decode("utf-8", errors="replace").rstrip("\n")
                if not text.strip():
                    continue
                try:
                    yield json.loads(text)
                except json.JSONDecodeError:
                    yield {"_raw": text}

    def head(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.head_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def verify(self) -> list[str]:
        """Every problem found (empty list: the chain is intact)."""
        problems: list[str] = []
        prev_hash, expected_seq = GENESIS, 0
        line = 0
        for line, entry in enumerate(self.entries(), start=1):
            if "_raw" in entry:
                problems.append(f"line {line}: not a JSON entry")
                expected_seq += 1
                prev_hash = None
                continue
            seq = entry.get("seq")
            if seq != expected_seq:
                problems.append(f"line {line}: seq {seq}, expected {expected_seq} "
                                "(an entry was deleted, inserted or moved)")
            if prev_hash is not None and entry.get("prev") != prev_hash:
                problems.append(f"line {line} (seq {seq}): prev hash does not match the entry before it")
            if entry.get("hash") != entry_hash(entry):
                problems.append(f"line {line} (seq {seq}): content does not match its hash (entry edited)")
            prev_hash = entry.get("hash")
            expected_seq = (seq if isinstance(seq, int) else expected_seq) + 1
        head = self.head()
        if line == 0 and head is None:
            return problems
        if head is None:
            problems.append(f"{self.head_path} is missing or unreadable: the end of the log cannot be checked")
        elif head.get("seq") != expected_seq - 1 or head.get("hash") != prev_hash:
            problems.append(f"the log ends at seq {expected_seq - 1} but its head file records seq "
                            f"{head.get('seq')}: entries were cut off the end or the head was altered")
        return problems


def _parse_last(line: bytes, path: Path) -> dict[str, Any] | None:
    if not line:
        return None
    try:
        prev = json.loads(line)
        if isinstance(prev.get("seq"), int) and isinstance(prev.get("hash"), str):
            return prev
    except (json.JSONDecodeError, AttributeError):
        pass
    raise FedcareError(f"audit log {path} is damaged at its last line; nothing is sent until it is "
                       "repaired (`fedcare site audit --verify` shows the problems)")


def _last_line(fh) -> bytes:
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return b""
    pos, chunk, buf = end, 4096, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return buf.rstrip(b"\n")
