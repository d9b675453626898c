"""A simulation on a real Ray cluster of two nodes: a head and a worker raylet started
as separate `ray start` processes on this machine, each offering one CPU and a custom
resource of its own. `fedcare simulate --ray-address` joins it, the virtual hospitals
train on both nodes, and the store says which node each ran on.

Each `ray start` runs in a session of its own, so that the test stops exactly the
processes of its cluster (never `ray stop`, which stops every Ray on the machine)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from e2e import simulate, superlinks_under
from fedcare.flower import free_port
from fedcare.server.store import Store

pytestmark = pytest.mark.e2e
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}


def _ray_start(*args: str) -> int:
    """`ray start ARGS` in a new session; returns that session's process group, which its
    daemons (GCS, raylet, workers) stay in after `ray start` returns."""
    proc = subprocess.Popen([*RAY, "start", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1", "--dashboard-agent-listen-port", str(free_port()), *args],
                            env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"ray start {' '.join(args)} failed:\n{out}"
    return proc.pid


def _stop(groups: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3 if sig == signal.SIGTERM else 0)


def _nodes(address: str) -> dict[str, str]:
    """Alive node id -> its custom resource (node_a / node_b), asked of the cluster."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps({n['NodeID']: [r for r in n['Resources'] if r.startswith('node_')] "
            "for n in ray.nodes() if n['Alive']}))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {node: res[0] for node, res in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_virtual_hospitals_train_on_both_nodes_of_a_ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    groups: list[int] = []
    try:
        groups.append(_ray_start("--head", "--port", str(port), "--resources", '{"node_a": 1}',
                                 "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                                 "--ray-client-server-port", str(free_port())))
        groups.append(_ray_start("--address", address, "--resources", '{"node_b": 1}'))
        nodes = _nodes(address)
        assert sorted(nodes.values()) == ["node_a", "node_b"]

        db = f"sqlite:///{tmp_path}/fed.db"
        run_id, rep = simulate(db, "--task", "heart-disease-virtual", "--sites", "4", "--rounds", "2",
                               "--ray-address", address, "--set", "train.local_steps=10",
                               timeout=300, workdir=tmp_path)
        assert rep["status"] == "completed" and len(rep["rounds"]) == 2
        with Store(db) as store:
            placed = [e["data"] for e in store.events(run_id) if e["kind"] == "placement"]
        assert len(placed) == 2 and all(set(p) == {f"site-{i}" for i in range(4)} for p in placed)
        used = {w.split("/")[1] for p in placed for w in p.values()}
        assert used == set(nodes), f"sites ran on {used}, the cluster's nodes are {nodes}"
        assert all(w.endswith("/cpu") for p in placed for w in p.values())
        assert {r["metrics"]["worker_nodes"] for r in rep["rounds"]} == {2.0}
        assert superlinks_under(tmp_path) == []
    finally:
        _stop(groups)
