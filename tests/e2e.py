"""Helpers for end-to-end tests: run the real `fedcare` CLI (real SuperLink, `flwr run`,
Ray simulation) and read back what landed in the store."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fedcare.certs import ServerMaterial, init_server
from fedcare.flower import free_port
from fedcare.server.deploy import Managed, TlsFiles, start_superlink, write_connection

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


def tls_superlink(root: Path) -> tuple[ServerMaterial, Managed, Path, int]:
    """A SuperLink with a fresh CA and TLS on a free loopback port, FLWR_HOME under
    ``root`` pointed at it: (tls, link, flwr_home, port). The caller stops the link."""
    tls = init_server(root / "tls", ["localhost"], ["127.0.0.1"])
    flwr_home, port = root / "flwr-home", free_port()
    link = start_superlink(TlsFiles.from_dir(root / "tls"), root / "superlink.db", root / "logs",
                           port=port, flwr_home=flwr_home)
    try:
        write_connection(flwr_home, f"127.0.0.1:{port}", tls.ca_cert)
    except BaseException:
        link.stop()
        raise
    return tls, link, flwr_home, port
