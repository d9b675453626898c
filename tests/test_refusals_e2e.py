"""Refusals a coordinator must see, through the real commands (issue 20, item 7)."""
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FEDCARE = shutil.which("fedcare") or "fedcare"


def test_fedcare_audit_fails_with_the_reason_when_the_audited_site_refuses_its_canaries(tmp_path):
    """heart-disease's logistic model holds at most 13 canaries: the audited site refuses
    20 and sends no bound while the others train, and `fedcare audit` used to print
    nothing and exit 0. (When every site refuses, the run itself is stored as failed.)"""
    out = subprocess.run([FEDCARE, "audit", "--canaries", "20", "--audited", "cleveland", "--rounds", "1", "--quiet",
                          "--db", f"sqlite:///{tmp_path}/audit.db", "--ledger-dir", str(tmp_path / "ledgers"),
                          "--set", "train.local_steps=2"],
                         capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "audit: no bound from cleveland; first refusal: round 1: cleveland refused" in out.stderr, out.stderr
    assert "at most 13 audit canaries" in out.stderr, out.stderr


def test_sigterm_to_server_run_stops_its_flower_run_and_the_store_says_so(tmp_path):
    """`fedcare server run` killed with SIGTERM used to leave its `flwr run` (and the
    ServerApp on the SuperLink) running, and the store said "running" forever. And
    without --sites a run records the sites the coordinator registered (3 here), not
    the task's 4."""
    import os
    import signal
    import time

    from fedcare.certs import create_site_keys, init_server
    from fedcare.flower import free_port
    from fedcare.server.deploy import (TlsFiles, _alive, _cmdline, descendants, register_site,
                                       start_superlink, write_connection)
    from fedcare.server.store import Store

    tls = init_server(tmp_path / "tls", ["localhost"], ["127.0.0.1"])
    flwr_home, port, db = tmp_path / "flwr-home", free_port(), f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "FEDCARE_FLWR_HOME": str(flwr_home), "FEDCARE_WORKDIR": str(tmp_path / "runs"),
           "FEDCARE_DB": db, "FLWR_TELEMETRY_ENABLED": "0"}
    link = start_superlink(TlsFiles.from_dir(tmp_path / "tls"), tmp_path / "superlink.db", tmp_path / "logs",
                           port=port, flwr_home=flwr_home)
    proc = None
    try:
        write_connection(flwr_home, f"127.0.0.1:{port}", tls.ca_cert)
        for site in ("cleveland", "hungarian", "va"):
            keys = create_site_keys(site, tmp_path / site)
            register_site(Path(f"{keys.private_key}.pub"), flwr_home)
        # no site ever joins: the ServerApp waits for strategy.min_sites
        proc = subprocess.Popen([FEDCARE, "server", "run", "--rounds", "1", "--quiet",
                                 "--set", "strategy.round_timeout=300"], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        store = Store(db)
        deadline = time.time() + 180
        while not link.find("flwr-serverapp") or not store.list_runs() \
                or store.list_runs()[0]["status"] != "running":
            assert time.time() < deadline and proc.poll() is None, "the run never started"
            time.sleep(0.5)
        flwr_run = [p for p in descendants(proc.pid) if "flwr" in _cmdline(p) and " run " in f" {_cmdline(p)} "]
        assert flwr_run, "no flwr run child"
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
        assert not any(_alive(p) for p in flwr_run)
        run_id = store.list_runs()[0]["run_id"]
        assert store.get_run(run_id)["sites"] == 3
        while link.find("flwr-serverapp") and time.time() < deadline:   # `flwr stop` ends the ServerApp too
            time.sleep(0.5)
        assert not link.find("flwr-serverapp")
        assert store.get_run(run_id)["status"] in ("interrupted", "failed"), store.get_run(run_id)
        store.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        link.stop()
