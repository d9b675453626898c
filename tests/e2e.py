"""Helpers for end-to-end tests: run the real `fedcare` CLI (real SuperLink, `flwr run`,
Ray simulation) and read back what landed in the store."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fedcare(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def simulate(db_url: str, *args: str, timeout: float = 900, workdir: Path | None = None) -> tuple[str, dict]:
    env = {"FEDCARE_WORKDIR": str(workdir)} if workdir else None
    res = fedcare("simulate", "--quiet", "--db", db_url, *args, timeout=timeout, env=env)
    assert res.returncode == 0, f"simulate failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    run_id = re.search(r"run (run-\S+) completed", res.stdout).group(1)
    rep = fedcare("report", run_id, "--db", db_url, "--json")
    assert rep.returncode == 0, rep.stderr
    return run_id, json.loads(rep.stdout)


def superlinks_under(workdir: Path) -> list[int]:
    """SuperLink processes whose FLWR_HOME lies under ``workdir`` (FEDCARE_WORKDIR of a
    simulate call), i.e. the ones that call started; other simulations are not counted."""
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True).stdout
    found = []
    for pid in map(int, out.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        homes = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"FLWR_HOME=")]
        if any(h.startswith(str(workdir)) for h in homes):
            found.append(pid)
    return found
