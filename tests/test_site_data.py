"""A site's own data: dataset.toml, the readers, the data contract, ``fedcare site check``,
and every kind of bad input named by file and row. Folders are written from the bundled
data (tests/sitefolders.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fedcare.client.check import check_folder, render
from fedcare.config import RunConfig
from fedcare.errors import DataError
from fedcare.models.families import prepare
from fedcare.models.sitedata import Contract, describe

from sitefolders import (ABSTRACT_LABELS, BREAST_LABELS, abstracts_sites, breast_dicom, breast_png,
                         heart_parquet, instruct_sites, write_toml)

TEXT = Contract(labels=ABSTRACT_LABELS, text_length=32)
IMAGE = Contract(labels=BREAST_LABELS, image_size=32)


def load(folder, contract):
    return prepare(describe(folder), contract)


def fails(folder, contract, *fragments):
    with pytest.raises(DataError) as err:
        load(folder, contract)
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.fixture
def text_sites(tmp_path):
    return abstracts_sites(tmp_path, per_site=12)


# ----------------------------------------------------------------------------- good folders
def test_heart_parquet_with_extra_columns_reads_as_the_bundled_centre(tmp_path):
    """Same rows, same FLamby split (66/34, seed 43) and standardisation as the bundled loader."""
    from fedcare.models.registry import get_task

    task = get_task("heart-disease")
    own = RunConfig(task="heart-disease")
    own.data.path = str(heart_parquet(tmp_path / "cleveland"))
    mine, bundled = task.load_site("hospital-a", own), task.load_site("cleveland", RunConfig())
    for a, b in ((mine.train, bundled.train), (mine.test, bundled.test)):
        assert torch.allclose(a.tensors[0], b.tensors[0], atol=1e-5) and torch.equal(a.tensors[1], b.tensors[1])
    assert set(mine.groups) == {"sex", "age_band"} and len(mine.groups["sex"]) == len(mine.test)


def test_text_folders_csv_jsonl_parquet(text_sites):
    sizes = []
    for folder in text_sites:
        p = load(folder, TEXT)
        ids, mask, y = p.split.train[0]
        assert ids.shape == (32,) and mask.sum() > 0 and 0 <= int(y) < 5
        sizes.append((len(p.split.train), len(p.split.test)))
    assert sizes[2] == (9, 3)   # hospital-c's given split column: every 4th row is test


def test_image_png_folders_and_dicom(tmp_path):
    png, dcm = breast_png(tmp_path / "png", n=8), breast_dicom(tmp_path / "dcm", n=8)
    for folder in (png, dcm):
        p = load(folder, IMAGE)
        x, y = p.split.train[0]
        assert x.shape == (1, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1 and int(y) in (0, 1)
    assert load(png, IMAGE).facts["sizes"].tolist()[0] == [56, 56]
    assert set(load(dcm, IMAGE).split.groups) == {"age_band"}


def test_instruct_prompt_response_and_messages(tmp_path):
    for folder in instruct_sites(tmp_path, per_site=5):
        p = load(folder, Contract())
        assert len(p.split.train) + len(p.split.test) == 5


def test_dataset_id_survives_moving_the_folder(tmp_path):
    from fedcare.client.site import Site
    from fedcare.models.registry import get_task

    folder = heart_parquet(tmp_path / "a")
    cfg = RunConfig(task="heart-disease")
    cfg.data.path = str(folder)
    before = Site("hospital-a", cfg, get_task("heart-disease"), {}).dataset_id
    moved = shutil.move(str(folder), str(tmp_path / "renamed"))
    cfg.data.path = moved
    assert Site("hospital-a", cfg, get_task("heart-disease"), {}).dataset_id == before == "cleveland"


def test_presets_load_a_sites_legacy_folder_whatever_its_site_id(tmp_path):
    """The reported bug: 'unknown site hospital-a for 4 virtual sites'."""
    from fedcare.models.data import bundled_dir
    from fedcare.models.registry import get_task

    abstracts = tmp_path / "abstracts"
    shutil.copytree(bundled_dir("medical-abstracts"), abstracts)
    cfg = RunConfig(task="medical-abstracts")
    cfg.update({"data.path": str(abstracts), "data.max_train_per_site": 6, "data.max_test_per_site": 4})
    split = get_task("medical-abstracts").load_site("hospital-a", cfg)
    assert (len(split.train), len(split.test)) == (6, 4)
    breast = tmp_path / "breast"
    shutil.copytree(bundled_dir("breastmnist"), breast)
    cfg = RunConfig(task="breastmnist")
    cfg.update({"data.path": str(breast), "data.max_train_per_site": 5, "data.max_test_per_site": 3})
    split = get_task("breastmnist").load_site("hospital-a", cfg)
    assert (len(split.train), len(split.test)) == (5, 3)


# ----------------------------------------------------------------------------- fedcare site check
def test_check_summary_per_family(tmp_path, text_sites):
    cfg = RunConfig()
    s = check_folder(str(heart_parquet(tmp_path / "h")), "heart-disease", cfg, 30)
    assert s["rows"] == {"train": 199, "test": 104, "dropped": 0}
    assert s["groups"]["age_band"]["<50"] == {"test_rows": 28, "suppressed": True}
    assert s["groups"]["sex"]["male"] == {"test_rows": 70, "suppressed": False}
    text = render(s)
    assert "28 (suppressed)" in text and "No record" in text
    s = check_folder(str(text_sites[0]), "medical-abstracts", cfg, 5)
    assert sum(c["train"] + c["test"] for c in s["classes"].values()) == 12
    assert s["text_lengths"]["chars_min"] > 0
    s = check_folder(str(breast_dicom(tmp_path / "d", n=8)), "breastmnist", cfg, 5)
    assert s["image_sizes"]["min"] == [28, 28]


def test_label_absent_at_this_site_is_allowed_and_reported(text_sites):
    csv = text_sites[0] / "abstracts.csv"
    df = pd.read_csv(csv)
    df[df["diagnosis_group"] != "neoplasms"].to_csv(csv, index=False)
    s = check_folder(str(text_sites[0]), "medical-abstracts", RunConfig(), 5)
    assert s["labels_absent_here"] == ["neoplasms"] and s["classes"]["neoplasms"] == {"train": 0, "test": 0}


def test_check_cli_prints_summary_and_exits_2_on_bad_data(tmp_path):
    folder = heart_parquet(tmp_path / "h")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [shutil.which("fedcare", path=os.path.dirname(sys.executable)) or "fedcare", "site", "check", "--data", str(folder), "--task", "heart-disease"]
    ok = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["dataset_id"] == "cleveland"
    df = pd.read_parquet(folder / "records.parquet")
    df.loc[7, "cp"] = 7.0
    df.to_parquet(folder / "records.parquet")
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "records.parquet row 8" in bad.stderr


# ----------------------------------------------------------------------------- bad input
def test_missing_or_misnamed_column(text_sites):
    csv = text_sites[0] / "abstracts.csv"
    pd.read_csv(csv).rename(columns={"abstract_text": "abstract"}).to_csv(csv, index=False)
    fails(text_sites[0], TEXT, "abstracts.csv", "no column 'abstract_text'", "abstract")


def test_unknown_label_names_file_and_line(text_sites):
    csv = text_sites[0] / "abstracts.csv"
    df = pd.read_csv(csv)
    df.loc[4, "diagnosis_group"] = "oncology"
    df.to_csv(csv, index=False)
    fails(text_sites[0], TEXT, "abstracts.csv line 6", "unknown label 'oncology'")


def test_empty_text(text_sites):
    path = text_sites[1] / "notes.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps(json.loads(lines[3]) | {"text": "   "})
    path.write_text("\n".join(lines) + "\n")
    fails(text_sites[1], TEXT, "notes.jsonl line 4", "is empty")


def test_non_utf8_text(text_sites):
    csv = text_sites[0] / "abstracts.csv"
    raw = csv.read_bytes().split(b"\n")
    cut = raw[5].index(b",") + 1
    raw[5] = raw[5][:cut] + "é".encode("latin-1") + raw[5][cut:]
    csv.write_bytes(b"\n".join(raw))
    fails(text_sites[0], TEXT, "abstracts.csv line 6", "not UTF-8")


def test_unreadable_image(tmp_path):
    folder = breast_png(tmp_path / "png", n=8)
    victim = sorted((folder / "train" / "benign").glob("*.png"))[0]
    victim.write_bytes(b"not a png at all")
    fails(folder, IMAGE, victim.name, "not a readable image")


def test_unreadable_dicom(tmp_path):
    folder = breast_dicom(tmp_path / "dcm", n=8)
    (folder / "dicom" / "img_00003.dcm").write_bytes(b"\0" * 64)
    fails(folder, IMAGE, "labels.csv line 5", "img_00003.dcm", "not a readable DICOM")


def test_colour_image_in_a_grey_dataset(tmp_path):
    from PIL import Image

    folder = breast_png(tmp_path / "png", n=8)
    victim = sorted((folder / "train" / "malignant").glob("*.png"))[0]
    Image.new("RGB", (28, 28), (200, 30, 30)).save(victim)
    fails(folder, IMAGE, victim.name, "colour image", 'colour = "grey"')


def test_empty_split(text_sites):
    folder = text_sites[2]
    for part in ("part-0.parquet", "part-1.parquet"):
        df = pd.read_parquet(folder / part)
        df.assign(split="train").to_parquet(folder / part)
    fails(folder, TEXT, "test split is empty")


def test_duplicate_ids(text_sites):
    csv = text_sites[0] / "abstracts.csv"
    df = pd.read_csv(csv)
    df.loc[9, "report_id"] = df.loc[2, "report_id"]
    df.to_csv(csv, index=False)
    fails(text_sites[0], TEXT, "abstracts.csv line 11", "duplicate", "line 4")


def test_description_contradicting_files(text_sites):
    toml = text_sites[0] / "dataset.toml"
    toml.write_text(toml.read_text().replace('format = "csv"', 'format = "parquet"'))
    fails(text_sites[0], TEXT, "abstracts.csv", "cannot read it as parquet")
    toml.write_text(toml.read_text().replace('format = "parquet"', 'format = "csv"')
                    .replace('"abstracts.csv"', '"abstracts-2023.csv"'))
    with pytest.raises(DataError, match="abstracts-2023.csv, which is not in"):
        describe(text_sites[0])


def test_labels_in_description_must_match_the_contract_order(text_sites):
    toml = text_sites[1] / "dataset.toml"
    toml.write_text("labels = " + json.dumps(list(reversed(ABSTRACT_LABELS))) + "\n" + toml.read_text())
    fails(text_sites[1], TEXT, "dataset.toml", "differ from the run's data contract")


def test_tabular_non_numeric_and_unknown_level(tmp_path):
    from fedcare.models.heart_disease import FEATURES, LABELS
    from fedcare.models.sitedata import parse_features

    contract = Contract(LABELS, parse_features(FEATURES))
    folder = heart_parquet(tmp_path / "h")
    df = pd.read_parquet(folder / "records.parquet")
    df.loc[11, "cp"] = 7.0
    df.to_parquet(folder / "records.parquet")
    fails(folder, contract, "records.parquet row 12", "'cp'", "1 | 2 | 3 | 4")
    df.loc[11, "cp"] = 1.0
    df["chol"] = df["chol"].astype(str)
    df.loc[20, "chol"] = "high"
    df.to_parquet(folder / "records.parquet")
    fails(folder, contract, "records.parquet row 21", "'chol'", "not a number")


def test_missing_values_are_dropped_and_counted(tmp_path):
    from fedcare.models.heart_disease import FEATURES, LABELS
    from fedcare.models.sitedata import parse_features

    folder = heart_parquet(tmp_path / "h")
    df = pd.read_parquet(folder / "records.parquet")
    df.loc[[3, 4, 5], "chol"] = np.nan
    df.to_parquet(folder / "records.parquet")
    p = load(folder, Contract(LABELS, parse_features(FEATURES)))
    assert p.facts["missing values"]["chol"] == 3 and p.labelled.dropped == 3
    assert len(p.split.train) + len(p.split.test) == len(df) - 3


def test_description_errors_name_the_key(tmp_path):
    write_toml(tmp_path / "x", 'family = "text"\nformat = "xlsx"\ndataset_id = "x"\nfiles = []\n')
    with pytest.raises(DataError, match="format for a text dataset must be one of csv, parquet, jsonl"):
        describe(tmp_path / "x")
    write_toml(tmp_path / "y", 'family = "text"\nformat = "csv"\nfiles = ["a.csv"]\n')
    with pytest.raises(DataError, match="dataset_id is missing"):
        describe(tmp_path / "y")
