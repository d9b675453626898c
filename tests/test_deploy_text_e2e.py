"""Deployed end to end, text family: a SuperLink with TLS and SuperNode authentication,
three hospitals each serving its own abstracts folder in a different format (CSV, JSONL,
Parquet, each with its dataset.toml), one round of MiniLM + LoRA under DP-SGD.

Every process started here is stopped in the fixture's teardown."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from fedcare.certs import create_site_keys, init_server
from fedcare.flower import free_port
from fedcare.server.deploy import (SiteSpec, TlsFiles, register_site, start_superlink, start_supernode,
                                   wait_joined, write_connection)

from sitefolders import ABSTRACT_LABELS, abstracts_sites

pytestmark = pytest.mark.e2e
FEDCARE = shutil.which("fedcare") or "fedcare"


def test_text_family_deployed_with_lora_and_dp(tmp_path):
    tls = init_server(tmp_path / "tls", ["localhost"], ["127.0.0.1"])
    home, db = tmp_path / "flwr-home", f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "FEDCARE_FLWR_HOME": str(home), "FEDCARE_WORKDIR": str(tmp_path / "runs"), "FEDCARE_DB": db}
    port = free_port()
    link, nodes = None, []
    try:
        link = start_superlink(TlsFiles.from_dir(tmp_path / "tls"), tmp_path / "state" / "superlink.db",
                               tmp_path / "logs", port=port, flwr_home=home)
        write_connection(home, f"127.0.0.1:{port}", tls.ca_cert)
        for folder in abstracts_sites(tmp_path / "sites", per_site=12):
            keys = create_site_keys(folder.name, tmp_path / "keys" / folder.name)
            assert register_site(keys.public_key, home) > 0
            spec = SiteSpec(site_id=folder.name, node_key=keys.private_key, data_path=folder,
                            ledger=tmp_path / f"{folder.name}.ledger.db", audit=tmp_path / f"{folder.name}.audit.jsonl",
                            port=free_port())
            nodes.append(start_supernode(spec, f"127.0.0.1:{port}", tls.ca_cert, tmp_path / "logs", flwr_home=home))
        for node in nodes:
            wait_joined(node, 120)
        t0 = time.perf_counter()
        out = subprocess.run(
            [FEDCARE, "server", "run", "--task", "text", "--rounds", "1", "--quiet",
             "--set", f"data.labels={','.join(ABSTRACT_LABELS)}", "--set", "data.text_length=32",
             "--set", "train.mode=lora", "--set", "train.local_steps=2", "--set", "train.batch_size=4",
             "--set", "dp.epsilon=8",
             "--set", "strategy.min_sites=3", "--set", "strategy.round_timeout=400"],
            env=env, capture_output=True, text=True, timeout=900)
        elapsed = time.perf_counter() - t0
        assert out.returncode == 0, out.stdout + out.stderr
        run_id = out.stdout.split()[1].rstrip(":")
        rep = json.loads(subprocess.run([FEDCARE, "report", run_id, "--db", db, "--json"], env=env,
                                        capture_output=True, text=True, timeout=120).stdout)
        print(f"deployed text e2e: 1 round, 3 sites, {elapsed:.1f} s")
        assert rep["status"] == "completed"
        sites = {s["site"]: s for s in rep["rounds"][0]["sites"]}
        assert set(sites) == {"hospital-a", "hospital-b", "hospital-c"}
        for s in sites.values():
            assert s["accepted"], s
            assert s["privacy"] and 0 < s["privacy"]["epsilon"] <= 8
        # the ledgers charge each description's dataset_id, not the folder path
        from fedcare.client.ledger import SiteLedger

        ids = {d["dataset_id"] for d in SiteLedger(tmp_path / "hospital-b.ledger.db").summary()}
        assert ids == {"hospital-b/notes"}
    finally:
        for node in nodes:
            node.stop()
        if link is not None:
            link.stop()
