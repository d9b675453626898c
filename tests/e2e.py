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


def simulate(db_url: str, *args: str, timeout: float = 900) -> tuple[str, dict]:
    res = fedcare("simulate", "--quiet", "--db", db_url, *args, timeout=timeout)
    assert res.returncode == 0, f"simulate failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    run_id = re.search(r"run (run-\S+) completed", res.stdout).group(1)
    rep = fedcare("report", run_id, "--db", db_url, "--json")
    assert rep.returncode == 0, rep.stderr
    return run_id, json.loads(rep.stdout)


def simulation_superlinks() -> set[str]:
    """Simulation-mode SuperLink processes now running (pid + command line)."""
    out = subprocess.run(["pgrep", "-af", "flower-superlink"], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if "--simulation" in line and "pgrep" not in line}
