"""Folder containment: every path that a site's dataset.toml or its tables name resolves
(symlinks followed) inside the site's folder; anything else is refused with one line that
quotes nothing of the file it points at."""
import os

import pandas as pd
import pytest

from fedcare.errors import DataError, public_reason
from fedcare.models.families import prepare
from fedcare.models.sitedata import Contract, describe

from sitefolders import breast_dicom, breast_png, write_toml

IMAGE = Contract(labels=("malignant", "benign/normal"), image_size=32)
TABULAR = Contract(labels=("no", "yes"), features=())
ROWS = "age,label\n" + "".join(f"{40 + i},{('no', 'yes')[i % 2]}\n" for i in range(10))


def refused(folder, contract=IMAGE):
    with pytest.raises(DataError) as err:
        prepare(describe(folder), contract)
    msg = str(err.value)
    assert "\n" not in msg and "outside the site's folder" in msg, msg
    assert "root:" not in msg                                   # nothing of what it points at is read
    assert public_reason(err.value).startswith("site refused (outside-folder)")
    return msg


def _tabular(folder, files):
    return write_toml(folder, f'dataset_id = "t"\nfamily = "tabular"\nformat = "csv"\nfiles = {files}\n')


@pytest.mark.parametrize("name", ["../other/records.csv", "ABSOLUTE", "/etc/passwd"])
def test_a_table_outside_the_folder_is_refused(tmp_path, name):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "records.csv").write_text(ROWS)
    if name == "ABSOLUTE":
        name = str(tmp_path / "other" / "records.csv")
    site = _tabular(tmp_path / "site", f'["{name}"]')
    refused(site, TABULAR)


def test_a_symlink_that_leaves_the_folder_is_refused_and_one_inside_is_read(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "records.csv").write_text(ROWS)
    site = _tabular(tmp_path / "site", '["records.csv"]')
    os.symlink(tmp_path / "other" / "records.csv", site / "records.csv")
    refused(site, TABULAR)
    inside = _tabular(tmp_path / "inside", '["link.csv"]')
    (inside / "real").mkdir()
    (inside / "real" / "records.csv").write_text(ROWS)
    os.symlink(inside / "real" / "records.csv", inside / "link.csv")
    from fedcare.models.sitedata import Feature
    assert len(prepare(describe(inside), Contract(("no", "yes"), (Feature("age"),))).labelled.table) == 10


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_dicom_path_column_outside_the_folder_is_refused(tmp_path, how):
    site = breast_dicom(tmp_path / "site", n=4)
    secret = breast_dicom(tmp_path / "secret", n=4) / "dicom" / "img_00000.dcm"
    table = pd.read_csv(site / "labels.csv")
    if how == "dotdot":
        table.loc[1, "path"] = "../secret/dicom/img_00000.dcm"
    elif how == "absolute":
        table.loc[1, "path"] = str(secret)
    else:
        os.symlink(secret, site / "dicom" / "link.dcm")
        table.loc[1, "path"] = "dicom/link.dcm"
    table.to_csv(site / "labels.csv", index=False)
    msg = refused(site)
    assert "labels.csv line 3" in msg


def test_a_class_folder_or_images_root_outside_the_folder_is_refused(tmp_path):
    site = breast_png(tmp_path / "site", n=8)
    other = breast_png(tmp_path / "other", n=8)
    os.symlink(other / "train" / "malignant", site / "train" / "stolen")
    refused(site)
    inside = breast_png(tmp_path / "images-root", n=8)
    text = (inside / "dataset.toml").read_text()
    (inside / "dataset.toml").write_text(text + '[columns]\nimages = "../other"\n')
    refused(inside)
