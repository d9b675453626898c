"""Every task family trains a federated round on hospital folders written from the bundled
data, each site serving its own folder (node config ``site-id`` + ``data-path``, as a
deployed SuperNode), through the real ServerApp loop and ClientApp handlers
(InProcessGrid: the same Flower messages, no SuperLink start-up)."""
from __future__ import annotations

import json

import torch

from fedcare.config import RunConfig
from fedcare.server.federation import run_federation
from fedcare.server.local_grid import InProcessGrid
from fedcare.server.report import build_report
from fedcare.server.store import Store

from sitefolders import (ABSTRACT_LABELS, BREAST_LABELS, abstracts_sites, breast_dicom, breast_png,
                         heart_parquet, instruct_sites)

torch.set_num_threads(1)


def federate(tmp_path, task: str, folders, **flat) -> dict:
    cfg = RunConfig(task=task, rounds=1, sites=len(folders), seed=3)
    from fedcare.models.registry import get_task

    cfg.update(get_task(task).settings("lora"))
    cfg.update({"train.local_steps": 1, "train.batch_size": 4, "train.eval_batch_size": 8,
                "strategy.min_sites": 2, **flat})
    cfg.validate()
    cfg.runtime.db = f"sqlite:///{tmp_path}/runs.db"
    nodes = [{"site-id": f.name, "data-path": str(f)} for f in folders]
    run_id = run_federation(InProcessGrid(cfg, len(folders), node_configs=nodes), cfg)
    store = Store(cfg.runtime.db)
    try:
        return build_report(store, run_id)
    finally:
        store.close()


def accepted(report: dict) -> dict[str, bool]:
    return {s["site"]: s["accepted"] for s in report["rounds"][0]["sites"]}


def test_text_family_three_hospitals_csv_jsonl_parquet(tmp_path):
    folders = abstracts_sites(tmp_path / "data", per_site=12)
    rep = federate(tmp_path, "text", folders, **{"data.labels": ",".join(ABSTRACT_LABELS), "data.text_length": 64})
    assert rep["status"] == "completed"
    assert accepted(rep) == {"hospital-a": True, "hospital-b": True, "hospital-c": True}
    assert set(rep["final"]["per_site"]) == {"hospital-a", "hospital-b", "hospital-c"}


def test_text_site_with_unknown_label_is_refused_and_others_go_on(tmp_path):
    folders = abstracts_sites(tmp_path / "data", per_site=10)
    bad = folders[1] / "notes.jsonl"
    lines = bad.read_text().splitlines()
    row = json.loads(lines[2]) | {"label": "oncology"}
    bad.write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    rep = federate(tmp_path, "text", folders, **{"data.labels": ",".join(ABSTRACT_LABELS), "data.text_length": 32})
    sites = {s["site"]: s for s in rep["rounds"][0]["sites"]}
    assert sites["hospital-a"]["accepted"] and sites["hospital-c"]["accepted"]
    assert not sites["hospital-b"]["accepted"]
    reason = json.dumps(sites["hospital-b"])   # where, never the value (the site's log has it)
    assert "notes.jsonl line 3, column label" in reason and "unknown-label" in reason and "oncology" not in reason


def test_medical_abstracts_preset_on_sites_own_folders(tmp_path):
    """The reported bug: a site with its own folder loads it whatever its site id."""
    folders = abstracts_sites(tmp_path / "data", per_site=10)[:2]
    rep = federate(tmp_path, "medical-abstracts", folders, **{"data.max_test_per_site": 4})
    assert accepted(rep) == {"hospital-a": True, "hospital-b": True}


def test_image_family_png_folders_and_dicom(tmp_path):
    folders = [breast_png(tmp_path / "png-site", n=12), breast_dicom(tmp_path / "dicom-site", n=12)]
    rep = federate(tmp_path, "image", folders, **{"data.labels": ",".join(BREAST_LABELS)})
    assert rep["status"] == "completed"
    assert accepted(rep) == {"png-site": True, "dicom-site": True}


def test_tabular_family_heart_parquet(tmp_path):
    from fedcare.models.heart_disease import FEATURES, LABELS

    folders = [heart_parquet(tmp_path / "cleveland"),
               heart_parquet(tmp_path / "hungary", "processed.hungarian.data", "hungary")]
    rep = federate(tmp_path, "tabular", folders, **{"data.labels": ",".join(LABELS), "data.features": FEATURES,
                                                    "train.local_steps": 20})
    assert accepted(rep) == {"cleveland": True, "hungary": True}
    assert rep["final"]["per_site"]["cleveland"]["accuracy"] > 0.5


def test_instruct_family_prompt_response_and_messages(tmp_path):
    folders = instruct_sites(tmp_path / "data", per_site=6)
    rep = federate(tmp_path, "instruct", folders, **{"data.text_length": 96, "train.batch_size": 2,
                                                     "train.eval_batch_size": 2})
    assert accepted(rep) == {"hospital-a": True, "hospital-b": True}
    final = rep["final"]["per_site"]["hospital-a"]
    assert final["answer_perplexity"] > 1 and 0 <= final["exact_match"] <= 1


def test_medical_llm_preset_on_sites_own_described_folders(tmp_path):
    """medical-llm reads a hospital's abstracts described in a dataset.toml (CSV, JSONL,
    Parquet) and asks each as its prompt; the answers are the preset's condition names."""
    folders = abstracts_sites(tmp_path / "data", per_site=10)[:2]
    rep = federate(tmp_path, "medical-llm", folders, **{"data.max_train_per_site": 4, "data.max_test_per_site": 2,
                                                         "train.batch_size": 2, "train.eval_batch_size": 2})
    assert rep["status"] == "completed"
    assert accepted(rep) == {"hospital-a": True, "hospital-b": True}
    assert set(rep["final"]["per_site"]) == {"hospital-a", "hospital-b"}   # evaluated on each own test split
