"""Data protocol: FLamby's Fed-Heart-Disease counts and splits, checksums, site data
validation, and the seeded Dirichlet partition."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fedcare.config import RunConfig
from fedcare.errors import DataError
from fedcare.models import heart_disease as hd
from fedcare.models.data import bundled_dir, dirichlet_partition, stratified_split, verify_files
from fedcare.models.registry import get_task

SPLITS = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va": (85, 45)}
CLEANED = {"cleveland": 303, "hungary": 261, "switzerland": 46, "va": 130}


def test_rows_after_cleaning():
    folder = bundled_dir("heart-disease")
    for site, (filename, _) in hd.CENTRES.items():
        assert len(hd.read_centre_file(folder / filename)) == CLEANED[site]


def test_flamby_split_sizes_features_and_standardisation():
    task, cfg = get_task("heart-disease"), RunConfig()
    assert task.site_ids(cfg) == list(SPLITS)
    total_train = total_test = 0
    for site, (n_train, n_test) in SPLITS.items():
        split = task.load_site(site, cfg)
        assert (len(split.train), len(split.test)) == (n_train, n_test)
        x_train = torch.stack([split.train[i][0] for i in range(len(split.train))])
        assert x_train.shape[1] == 13 and x_train.dtype == torch.float32
        # standardised with the centre's own train statistics (constant columns stay 0)
        assert torch.allclose(x_train.mean(0), torch.zeros(13), atol=1e-5)
        std = x_train.std(0)
        assert ((std - 1).abs() < 1e-4).logical_or(std < 1e-6).all()
        y = torch.stack([split.test[i][1] for i in range(len(split.test))])
        assert set(y.tolist()) <= {0.0, 1.0}
        assert set(split.groups) == {"sex", "age_band"}
        assert all(len(g) == n_test for g in split.groups.values())
        total_train, total_test = total_train + n_train, total_test + n_test
    assert (total_train, total_test) == (486, 254)


def test_split_is_stratified_like_flamby():
    raw = hd.read_centre_file(bundled_dir("heart-disease") / "processed.cleveland.data")
    _, y = hd.encode(raw)
    train, test = hd.split_indices(y)
    assert abs(y[train].mean() - y[test].mean()) < 0.02
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(y)


def test_logistic_regression_learns_cleveland():
    from fedcare.models.training import make_optimizer, make_train_loader, predict_dataset, train_steps

    task, cfg = get_task("heart-disease"), RunConfig()
    split = task.load_site("cleveland", cfg)
    model = task.build_model(cfg)
    before = predict_dataset(task, model, split.test, cfg, torch.device("cpu"))
    train_steps(task, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 0), 300,
                torch.device("cpu"))
    scores, labels = predict_dataset(task, model, split.test, cfg, torch.device("cpu"))
    assert scores.shape == (104, 2) and np.allclose(scores.sum(1), 1)
    acc = task.metrics(scores, labels)["accuracy"]
    assert acc > 0.7 and acc > task.metrics(*before)["accuracy"]


def test_corrupted_copy_raises_data_error(tmp_path, monkeypatch):
    shutil.copytree(bundled_dir("heart-disease"), tmp_path / "heart-disease")
    monkeypatch.setenv("FEDCARE_DATA_DIR", str(tmp_path))
    task, cfg = get_task("heart-disease"), RunConfig()
    assert len(task.load_site("va", cfg).train) == 85  # intact copy loads
    target = tmp_path / "heart-disease" / "processed.va.data"
    target.write_bytes(target.read_bytes().replace(b"63,1,4,140", b"64,1,4,140", 1))
    with pytest.raises(DataError, match="processed.va.data.*corrupted"):
        task.load_site("va", cfg)
    target.unlink()
    with pytest.raises(DataError, match="processed.va.data.*missing"):
        task.load_site("cleveland", cfg)


def test_medical_abstracts_checksum(tmp_path):
    shutil.copytree(bundled_dir("medical-abstracts"), tmp_path / "ma")
    checksums = {"medical_tc_test.csv": "98978fd21c156efe960d901451161817"}
    verify_files(tmp_path / "ma", checksums)
    with open(tmp_path / "ma" / "medical_tc_test.csv", "ab") as fh:
        fh.write(b"\n")
    with pytest.raises(DataError, match="medical_tc_test.csv.*corrupted"):
        verify_files(tmp_path / "ma", checksums)


def test_site_own_data_folder(tmp_path):
    task = get_task("heart-disease")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(bundled_dir("heart-disease") / "processed.hungarian.data", site / "ours.data")
    cfg = RunConfig()
    cfg.data.path = str(site)
    split = task.load_site("my-hospital", cfg)
    assert (len(split.train), len(split.test)) == (172, 89)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.data").write_text("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n63,1,9,145,233,1,2,150,0,2.3,3,0,6,0\n")
    cfg.data.path = str(bad)
    with pytest.raises(DataError, match=r"x.data, line 2: cp=9"):
        task.load_site("my-hospital", cfg)
    (bad / "x.data").write_text("63,1,1,145,233\n")
    with pytest.raises(DataError, match=r"x.data, line 1: expected 14"):
        task.load_site("my-hospital", cfg)
    cfg.data.path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="exactly one"):
        task.load_site("my-hospital", cfg)


def _labels(n_classes=5, per_class=(60, 30, 40, 60, 90)):
    return np.concatenate([np.full(n, c) for c, n in zip(range(n_classes), per_class)])


def test_dirichlet_partition_seeded_and_complete():
    train, test = _labels(), _labels(per_class=(15, 8, 10, 15, 22))
    a = dirichlet_partition(train, test, n_sites=6, alpha=0.1, seed=7, min_test=3)
    b = dirichlet_partition(train, test, n_sites=6, alpha=0.1, seed=7, min_test=3)
    c = dirichlet_partition(train, test, n_sites=6, alpha=0.1, seed=8, min_test=3)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    # a partition: every example exactly once, every site has train and test examples
    assert sorted(np.concatenate([tr for tr, _ in a]).tolist()) == list(range(len(train)))
    assert sorted(np.concatenate([te for _, te in a]).tolist()) == list(range(len(test)))
    assert all(len(tr) >= 2 and len(te) >= 3 for tr, te in a)
    # alpha=0.1 is strongly skewed: some site is dominated by one class
    assert max(np.bincount(train[tr]).max() / len(tr) for tr, _ in a) > 0.7


def test_dirichlet_large_alpha_is_nearly_iid():
    train, test = _labels(), _labels()
    parts = dirichlet_partition(train, test, n_sites=3, alpha=1000.0, seed=0)
    for tr, _ in parts:
        mix = np.bincount(train[tr], minlength=5) / len(tr)
        assert np.abs(mix - np.bincount(train) / len(train)).max() < 0.05


def test_dirichlet_too_few_examples():
    with pytest.raises(DataError, match="not enough examples"):
        dirichlet_partition(np.zeros(5), np.zeros(5), n_sites=4, alpha=1.0, seed=0)


def test_stratified_split_seeded():
    y = _labels()
    tr1, te1 = stratified_split(y, 0.2, seed=1)
    tr2, te2 = stratified_split(y, 0.2, seed=1)
    assert np.array_equal(te1, te2) and len(te1) == 56
    assert np.allclose(np.bincount(y[te1]) / len(te1), np.bincount(y) / len(y), atol=0.02)
