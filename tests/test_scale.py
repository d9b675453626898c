"""Many virtual hospitals: a round is stored in a few statements whatever the number of
sites, a virtual site's data is made alone when asked for, a fraction of the sites is
sampled per round, and the Ray options of `fedcare simulate` are checked before
anything starts (the GPU path runs where a GPU is)."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from flwr.app import ConfigRecord
from typer.testing import CliRunner

from e2e import fedcare, simulate

from fedcare.cli import app
from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.flower import RaySetup, ray_setup
from fedcare.launch import resolve_config
from fedcare.models.heart_virtual import HeartDiseaseVirtualTask
from fedcare.schemas import ACCEPTED, Evaluation, RoundRecord, SiteRound
from fedcare.server.federation import Federation, run_federation
from fedcare.server.local_grid import InProcessGrid
from fedcare.server.report import build_report
from fedcare.server.store import Store

GPU = torch.cuda.is_available()


def _record(rnd: int, n: int) -> RoundRecord:
    sites = [SiteRound(site=f"site-{i}", status=ACCEPTED, node_id=1000 + i, num_examples=32, train_loss=0.5,
                       update_bytes=56, duration_s=0.1, metrics={"latency_s": 0.2}) for i in range(n)]
    evals = [Evaluation(scope="global", metrics={"accuracy": 0.7}, num_examples=16 * n)]
    evals += [Evaluation(scope=f"site-{i}", metrics={"accuracy": i / n}, num_examples=16) for i in range(n)]
    return RoundRecord(round=rnd, started_at=0.0, ended_at=1.0, metrics={"aggregated": 1.0}, sites=sites,
                       evaluations=evals, global_state={"w": np.zeros((1, 13), np.float32)}, fairness=None)


def test_a_round_of_a_thousand_sites_is_a_few_statements_in_one_transaction(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cur, stmt, params, ctx, many: statements.append(stmt.split()[0]))
    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda conn: commits.append(1))
    run_id = store.create_run("heart-disease-virtual", "fedavg", {"sites": 1000}, "test")
    counts = {}
    for rnd, n in ((1, 10), (2, 1000)):
        statements.clear(), commits.clear()
        t0 = time.perf_counter()
        store.write_round(run_id, _record(rnd, n))
        counts[n] = (len(statements), time.perf_counter() - t0)
        assert len(commits) == 1
    assert counts[1000][0] == counts[10][0], counts     # no statement per site
    assert counts[1000][1] < 2.0, counts
    assert len(store.site_rounds(run_id, 2)) == 1000 and len(store.evaluations(run_id, 2)) == 1001
    store.close()


def test_the_report_of_a_thousand_sites_names_the_worst_instead_of_listing_them(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    with Store(url) as store:
        run_id = store.create_run("heart-disease-virtual", "fedavg", {"sites": 1000}, "test")
        store.write_round(run_id, _record(1, 1000))
        t0 = time.perf_counter()
        rep = build_report(store, run_id)
        assert time.perf_counter() - t0 < 5.0
    assert [w["site"] for w in rep["final"]["worst_sites"]] == ["site-0", "site-1", "site-2", "site-3", "site-4"]
    out = CliRunner().invoke(app, ["report", run_id, "--db", url]).output
    assert "1000 sites evaluated in round 1: accuracy min 0.0000" in out and "worst sites: site-0 (0.0000)" in out
    assert len(out.splitlines()) < 10


def test_reading_a_run_does_not_import_pytorch():
    """`fedcare report` and the dashboard read the store: importing PyTorch (seconds on a
    loaded machine) is for writing a global state, not for reading a run."""
    code = "import sys, fedcare.server.report, fedcare.server.queries; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_a_virtual_site_is_made_alone_the_same_each_time_with_its_own_label_mix():
    task = HeartDiseaseVirtualTask()
    cfg = RunConfig(task=task.name, sites=1000)
    cfg.data.dirichlet_alpha = 0.3
    assert len(task.site_ids(cfg)) == 1000
    t0 = time.perf_counter()
    last = task.load_site("site-999", cfg)
    assert time.perf_counter() - t0 < 2.0
    again = task.load_site("site-999", cfg)
    assert torch.equal(last.train.tensors[0], again.train.tensors[0])
    assert len(last.train) == 32 and len(last.test) == 16 and set(last.groups) == {"sex", "age_band"}
    positives = [float(task.load_site(f"site-{i}", cfg).train.tensors[1].mean()) for i in range(20)]
    assert min(positives) < 0.2 and max(positives) > 0.8          # skewed at alpha 0.3
    cfg.data.dirichlet_alpha = 1000.0
    iid = [float(task.load_site(f"site-{i}", cfg).train.tensors[1].mean()) for i in range(20)]
    assert 0.25 < min(iid) and max(iid) < 0.8                      # about the pool's mix
    with pytest.raises(FedcareError, match="site-0 .. site-999"):
        task.load_site("site-1000", cfg)


def test_a_tenth_of_two_hundred_sites_trains_and_evaluates_each_round(tmp_path):
    cfg = resolve_config("heart-disease-virtual", ["train.local_steps=2", "strategy.fraction_train=0.05",
                                                   "strategy.fraction_evaluate=0.05"], sites=200, rounds=2, seed=5)
    cfg.runtime.db = f"sqlite:///{tmp_path}/loop.db"
    run_id = run_federation(InProcessGrid(cfg, 200), cfg)
    with Store(cfg.runtime.db) as store:
        rounds = store.rounds(run_id)
        trained = [{r["site"] for r in store.site_rounds(run_id, n)} for n in (1, 2)]
        evaluated = [{e["scope"] for e in store.evaluations(run_id, n)} - {"global"} for n in (1, 2)]
    assert [r["num_sites"] for r in rounds] == [10, 10] and all(r["num_accepted"] == 10 for r in rounds)
    assert trained[0] != trained[1] and all(len(e) == 10 for e in evaluated)


def test_the_sites_sampled_each_round_follow_the_run_seed(tmp_path):
    """--seed covers sampling: the same seed and round pick the same sites (a resumed or
    repeated run trains the same hospitals), another round or seed others."""
    def sampled(seed: int, rnd: int) -> list[int]:
        cfg = resolve_config("heart-disease-virtual", ["strategy.fraction_train=0.1"], sites=100, rounds=2, seed=seed)
        with Store(f"sqlite:///{tmp_path}/{seed}.db") as store:
            fed = Federation(InProcessGrid(cfg, 100), cfg, store, "unused")
            return [m.metadata.dst_node_id for m in fed._messages("train", rnd, {}, ConfigRecord(), 0.1)]

    first = sampled(7, 1)
    assert len(first) == 10 and sampled(7, 1) == first
    assert sampled(7, 2) != first and sampled(8, 1) != first


def test_ray_options_are_checked_before_anything_starts(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(FedcareError, match="whole CPUs"):
        ray_setup(site_cpus=0.5)
    local = ray_setup(site_gpus=0.0, num_sites=4)
    assert local.address is None and local.backend()["init-args"]["num-cpus"] >= 1
    joined = RaySetup("10.0.0.5:6379", 2, 0.5, 64, 8).backend()
    assert joined == {"client-resources": {"num-cpus": 2, "num-gpus": 0.5}}   # no counts when joining
    if not GPU:
        assert ray_setup(num_sites=4).site_gpus == 0.0
        res = fedcare("simulate", "--task", "heart-disease-virtual", "--sites", "2", "--site-gpus", "0.5",
                      "--db", "sqlite:////nonexistent/never.db")
        assert res.returncode == 2 and "has no GPU" in res.stderr, res.stderr


@pytest.mark.e2e
@pytest.mark.skipif(not GPU, reason="no CUDA GPU on this machine: the --site-gpus path needs one")
def test_two_virtual_sites_share_a_gpu_and_train_on_cuda(tmp_path):
    db = f"sqlite:///{tmp_path}/gpu.db"
    run_id, rep = simulate(db, "--task", "heart-disease-virtual", "--sites", "2", "--rounds", "1",
                           "--site-gpus", "0.5", "--set", "train.local_steps=5", timeout=300, workdir=tmp_path)
    assert rep["status"] == "completed"
    with Store(db) as store:
        (placed,) = [e["data"] for e in store.events(run_id) if e["kind"] == "placement"]
    assert len(placed) == 2 and all(w.endswith("/cuda") for w in placed.values()), placed
