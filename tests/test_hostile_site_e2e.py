"""A hostile hospital with real processes: a TLS SuperLink, authenticated SuperNodes,
and at two sites an executor that tampers with its replies after fedcare's handler made
them (tests/hostile_executor.py). The server rejects each bad reply with its reason,
records it, and the honest site's rounds go on (the in-process version with more kinds
of tampering is tests/test_trust_boundary.py)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcare.certs import create_site_keys, init_server
from fedcare.flower import free_port
from fedcare.server.deploy import (SiteSpec, TlsFiles, register_site, start_site, start_superlink,
                                   start_supernode, wait_joined, write_connection, write_secret)

ROOT = Path(__file__).resolve().parent.parent
FEDCARE = shutil.which("fedcare") or "fedcare"
SITES = {"cleveland": ("processed.cleveland.data", None),
         "hungarian": ("processed.hungarian.data", "bad-json-then-replay"),
         "va": ("processed.va.data", "oversized")}


def _hostile_executor(spec: SiteSpec, mode: str, logs: Path, env: dict) -> subprocess.Popen:
    log = logs / f"{spec.site_id}.hostile-executor.log"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_executor.py"), mode,
                             "--runtime-api", f"{spec.host}:{spec.port}", "--secret-file", str(spec.executor_secret)],
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while "claiming tasks" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    return proc


@pytest.mark.e2e
def test_hostile_sites_are_rejected_with_their_reasons_and_the_honest_one_finishes(tmp_path):
    tls = init_server(tmp_path / "tls", ["localhost"], ["127.0.0.1"])
    flwr_home, port, logs = tmp_path / "flwr-home", free_port(), tmp_path / "logs"
    db = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "FEDCARE_FLWR_HOME": str(flwr_home), "FEDCARE_WORKDIR": str(tmp_path / "runs"),
           "FEDCARE_DB": db, "FLWR_TELEMETRY_ENABLED": "0"}
    managed, hostile = [], []
    try:
        managed.append(start_superlink(TlsFiles.from_dir(tmp_path / "tls"), tmp_path / "superlink.db", logs,
                                       port=port, flwr_home=flwr_home))
        write_connection(flwr_home, f"127.0.0.1:{port}", tls.ca_cert)
        for site, (data_file, mode) in SITES.items():
            keys = create_site_keys(site, tmp_path / site / "keys")
            assert register_site(Path(f"{keys.private_key}.pub"), flwr_home) > 0
            data = tmp_path / site / "data"
            data.mkdir(parents=True)
            shutil.copy(ROOT / "data" / "heart-disease" / data_file, data)
            spec = SiteSpec(site, keys.private_key, data_path=data, ledger=tmp_path / site / "ledger.db",
                            audit=tmp_path / site / "audit.jsonl", port=free_port())
            if mode is None:
                node, helper = start_site(spec, f"127.0.0.1:{port}", tls.ca_cert, logs, flwr_home=flwr_home)
                managed += [node, helper]
            else:
                spec = dataclasses.replace(spec, executor_secret=write_secret(logs / f"{site}.superexec.secret"))
                node = start_supernode(spec, f"127.0.0.1:{port}", tls.ca_cert, logs, flwr_home=flwr_home)
                managed.append(node)
                hostile.append(_hostile_executor(spec, mode, logs, env))
            wait_joined(node, 120)

        out = subprocess.run([FEDCARE, "server", "run", "--task", "heart-disease", "--rounds", "2", "--quiet",
                              "--set", "train.local_steps=3", "--set", "strategy.min_sites=1",
                              "--set", "strategy.round_timeout=120", "--set", "dp.epsilon=50",
                              "--set", "dp.delta=1e-3"],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        run_id = out.stdout.split()[1].rstrip(":")
        rep = json.loads(subprocess.run([FEDCARE, "report", run_id, "--db", db, "--json"], env=env,
                                        capture_output=True, text=True, timeout=120).stdout)
    finally:
        for proc in hostile:
            proc.kill()
        for proc in reversed(managed):
            proc.stop()

    assert rep["status"] == "completed"
    r1, r2 = ({s["site"]: s for s in rnd["sites"]} for rnd in rep["rounds"])
    assert r1["cleveland"]["accepted"] and r2["cleveland"]["accepted"], (r1, r2)
    assert not r1["hungarian"]["accepted"] and "privacy_json is not valid JSON" in r1["hungarian"]["reason"], r1
    assert not r2["hungarian"]["accepted"] and "nonce" in r2["hungarian"]["reason"], r2   # the replay
    for r in (r1, r2):
        assert not r["va"]["accepted"] and "declares shape (4096, 4096)" in r["va"]["reason"], r
    assert all(rnd["metrics"]["aggregated"] == 1.0 for rnd in rep["rounds"])
    assert "cleveland" in rep["final"]["per_site"]
