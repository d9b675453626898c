"""A simulation on a real Ray cluster of two nodes: a head and a worker raylet started
as separate `ray start` processes on this machine (fedcare/raycluster.py), each offering
one CPU and a custom resource of its own. `fedcare simulate --ray-address` joins it, the
virtual hospitals train on both nodes, the store says which node each ran on, and the
test stops exactly the cluster's processes."""
from __future__ import annotations

import pytest

from e2e import simulate, superlinks_under
from fedcare.raycluster import local_cluster
from fedcare.server.store import Store

pytestmark = pytest.mark.e2e


def test_virtual_hospitals_train_on_both_nodes_of_a_ray_cluster(tmp_path):
    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        nodes = cluster.nodes()
        assert sorted(nodes.values()) == ["node_a", "node_b"]
        db = f"sqlite:///{tmp_path}/fed.db"
        run_id, rep = simulate(db, "--task", "heart-disease-virtual", "--sites", "4", "--rounds", "2",
                               "--ray-address", cluster.address, "--set", "train.local_steps=10",
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
        groups = list(cluster.groups)
    assert cluster.pids() == [] and len(groups) == 2, "the cluster's processes outlived the test"
