"""End to end: `fedcare simulate` runs real Flower processes and every round lands in SQL."""
import json

import numpy as np
import pytest

from e2e import fedcare, simulate, superlinks_under

pytestmark = pytest.mark.e2e


def test_heart_disease_three_rounds_with_a_poisoned_site(tmp_path):
    db = f"sqlite:///{tmp_path}/fed.db"
    run_id, rep = simulate(db, "--task", "heart-disease", "--rounds", "3",
                           "--set", "faults.site=switzerland", "--set", "faults.kind=nan", workdir=tmp_path)
    assert rep["status"] == "completed" and rep["task"] == "heart-disease" and rep["strategy"] == "fedavg"
    assert [r["round"] for r in rep["rounds"]] == [1, 2, 3]
    for r in rep["rounds"]:
        sites = {s["site"]: s for s in r["sites"]}
        assert set(sites) == {"cleveland", "hungary", "switzerland", "va"}
        bad = sites.pop("switzerland")
        assert bad["accepted"] is False and bad["status"] == "rejected" and "non-finite" in bad["reason"]
        assert all(s["accepted"] and s["num_examples"] > 0 and s["update_bytes"] == 14 * 4 for s in sites.values())
        assert r["metrics"]["aggregated"] == 1.0 and np.isfinite(r["metrics"]["eval"]["accuracy"])
    assert set(rep["final"]["per_site"]) == {"cleveland", "hungary", "switzerland", "va"}
    assert 0.5 < rep["final"]["metrics"]["accuracy"] <= 1.0
    assert {"sex", "age_band", "by_site"} <= set(rep["fairness"])
    listed = json.loads(fedcare("runs", "--db", db, "--json").stdout)
    assert [r["run_id"] for r in listed] == [run_id]
    assert (tmp_path / "fedcare-runs" / run_id / "flwr-home").is_dir()
    assert superlinks_under(tmp_path) == [], "simulate left its SuperLink running"


def test_medical_abstracts_lora_with_heterogeneous_ranks(tmp_path):
    """LoRA updates are a small fraction of the model; sites of rank 4 and 8 federate
    through exact (SVD) aggregation and each sends an update of its own rank."""
    db = f"sqlite:///{tmp_path}/fed.db"
    _, rep = simulate(db, "--task", "medical-abstracts", "--sites", "4", "--rounds", "2", "--set", "train.mode=lora",
                      "--set", "data.max_train_per_site=24", "--set", "data.max_test_per_site=12",
                      "--set", "train.local_steps=2", "--set", "train.batch_size=8",
                      "--set", "lora.site_ranks=4,8,8,4", "--set", "lora.aggregation=exact")
    assert len(rep["rounds"]) == 2
    from fedcare.config import RunConfig
    from fedcare.models.registry import get_task

    model = get_task("medical-abstracts").build_model(RunConfig(task="medical-abstracts"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in rep["rounds"]:
        assert len(r["sites"]) == 4 and all(s["accepted"] for s in r["sites"])
        for s in r["sites"]:
            assert 0 < s["update_bytes"] < 0.05 * model_bytes
    assert "accuracy" in rep["final"]["metrics"] and "macro_f1" in rep["final"]["metrics"]
    for r in rep["rounds"]:
        sizes = {s["site"]: s["update_bytes"] for s in r["sites"]}
        assert sizes["site-0"] == sizes["site-3"] < sizes["site-1"] == sizes["site-2"]
        assert (r["metrics"]["lora_rank_min"], r["metrics"]["lora_rank_max"]) == (4.0, 8.0)
        assert 0 <= r["metrics"]["svd_rel_error"] < 1


def test_bad_input_leaves_nothing_half_written(tmp_path):
    db = f"sqlite:///{tmp_path}/fed.db"
    res = fedcare("simulate", "--db", db, "--set", "dp.epsilon=1", "--set", "dp.max_grad_norm=-1")
    assert res.returncode == 2 and "clipping norm" in res.stderr
    runs = fedcare("runs", "--db", db, "--json")
    assert json.loads(runs.stdout) == []


def test_demo_ends_with_a_text_model_that_learnt(tmp_path):
    """`fedcare demo`: both runs complete, and its last lines show the text model (head
    mode) before and after federated training; after 3 rounds it clearly beats both
    chance (accuracy 0.2) and the one-class model (accuracy ~0.33, macro-F1 ~0.1)."""
    import re

    res = fedcare("demo", "--db", f"sqlite:///{tmp_path}/demo.db", timeout=1800,
                  env={"FEDCARE_WORKDIR": str(tmp_path)})
    assert res.returncode == 0, f"demo failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.count(" completed: 3 rounds stored") == 2
    lines = re.findall(r"^  (before federated training|after 3 rounds)\s+accuracy (\S+)  macro-F1 (\S+)$",
                       res.stdout, re.M)
    assert [label for label, _, _ in lines] == ["before federated training", "after 3 rounds"], res.stdout[-2000:]
    (acc0, _), (acc, f1) = [(float(a), float(f)) for _, a, f in lines]
    assert res.stdout.rstrip().splitlines()[-1].startswith("  after 3 rounds")
    assert acc >= 0.45 and f1 >= 0.35, (acc, f1)
    assert acc >= acc0 + 0.15, (acc0, acc)


def test_simulation_superlink_moves_to_a_free_port_when_its_port_was_taken(tmp_path):
    """Another process takes the port between free_port() and the SuperLink's bind: the
    SuperLink is started again on fresh ports and the connection follows it."""
    import socket

    import tomli_w
    import tomllib

    from fedcare import flower

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "fedcare", "fedcare": {
        "address": "127.0.0.1:1", "insecure": True}}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, log = flower._start_superlink(port, flower.free_port(), flower.flwr_env(home), tmp_path / "sl.log")
        try:
            address = tomllib.loads((home / "config.toml").read_text())["superlink"]["fedcare"]["address"]
            assert proc.poll() is None and address != f"127.0.0.1:{port}"
            with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=5):
                pass
        finally:
            flower.stop(proc)
            log.close()
