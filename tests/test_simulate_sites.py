"""``fedcare simulate --site NAME=FOLDER``: each virtual site of a simulation reads its own
described folder (three tabular folders in three formats here), under the name given."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from fedcare.errors import ConfigError, DataError
from fedcare.launch import resolve_config, site_sets
from fedcare.server.federation import run_federation
from fedcare.server.local_grid import InProcessGrid
from fedcare.server.report import build_report
from fedcare.server.store import Store

from sitefolders import heart_parquet, write_toml

CONTRACT = ["data.labels=no disease,disease", "data.features=age,sex,thalach,oldpeak"]


def three_formats(root):
    """The Cleveland centre split over a Parquet, a CSV and a JSONL hospital."""
    a = heart_parquet(root / "parquet-site")
    frame = pd.read_parquet(a / "records.parquet")
    b = write_toml(root / "csv-site", (a / "dataset.toml").read_text().replace('format = "parquet"', 'format = "csv"')
                   .replace("records.parquet", "records.csv").replace('"cleveland"', '"csv-site"'))
    frame.iloc[:150].to_csv(b / "records.csv", index=False)
    c = write_toml(root / "jsonl-site", (a / "dataset.toml").read_text().replace('format = "parquet"', 'format = "jsonl"')
                   .replace("records.parquet", "records.jsonl").replace('"cleveland"', '"jsonl-site"'))
    frame.iloc[150:].to_json(c / "records.jsonl", orient="records", lines=True)
    return {"a": a, "b": b, "c": c}


def test_each_virtual_site_reads_its_own_folder(tmp_path):
    folders = three_formats(tmp_path)
    cfg = resolve_config("tabular", [*CONTRACT, "train.local_steps=3", *site_sets([f"{k}={v}" for k, v in folders.items()])],
                         sites=3, rounds=1, seed=3)
    cfg.runtime.db = f"sqlite:///{tmp_path}/runs.db"
    run_id = run_federation(InProcessGrid(cfg, 3), cfg)    # virtual partitions, as Flower's simulation gives
    store = Store(cfg.runtime.db)
    try:
        rep = build_report(store, run_id)
    finally:
        store.close()
    sites = {s["site"]: s for s in rep["rounds"][0]["sites"]}
    assert set(sites) == {"a", "b", "c"} and all(s["accepted"] for s in sites.values()), sites
    # each site's own rows: 303 Cleveland rows split 303 / 150 / 153, 66% of each for training
    assert {k: s["num_examples"] for k, s in sites.items()} == {"a": 199, "b": 98, "c": 100}


def test_a_site_without_a_description_or_named_twice_is_refused_before_the_run(tmp_path):
    with pytest.raises(DataError, match="--site x=.*no dataset.toml"):
        site_sets([f"x={tmp_path}"])
    write_toml(tmp_path / "f", 'dataset_id = "f"\nfamily = "tabular"\nformat = "csv"\nfiles = ["r.csv"]\n')
    with pytest.raises(ConfigError, match="given twice"):
        site_sets([f"x={tmp_path / 'f'}", f"x={tmp_path / 'f'}"])
    with pytest.raises(ConfigError, match="NAME=FOLDER"):
        site_sets([str(tmp_path / "f")])


@pytest.mark.e2e
def test_fedcare_simulate_with_three_site_folders(tmp_path):
    folders = three_formats(tmp_path)
    fedcare = shutil.which("fedcare") or [sys.executable, "-m", "fedcare.cli"]
    cmd = [fedcare] if isinstance(fedcare, str) else fedcare
    db = f"sqlite:///{tmp_path}/sim.db"
    args = [*cmd, "simulate", "--task", "tabular", "--rounds", "1", "--quiet", "--db", db,
            *(x for k, v in folders.items() for x in ("--site", f"{k}={v}")),
            *(x for s in [*CONTRACT, "train.local_steps=3"] for x in ("--set", s))]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ | {"FEDCARE_DB": db})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    store = Store(db)
    try:
        (run,) = store.list_runs()
        rows = store.site_rounds(run["run_id"])
    finally:
        store.close()
    assert {r["site"]: r["status"] for r in rows} == {"a": "accepted", "b": "accepted", "c": "accepted"}, \
        json.dumps(rows, default=str)
