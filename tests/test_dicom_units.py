"""DICOM in the right units, with pydicom's own real CT and MR test files: the modality
LUT (RescaleSlope/Intercept on signed pixels: HU for CT), a window (dataset.toml's, else
the file's WindowCenter/Width), MONOCHROME1 inverted, multi-frame refused; and
``fedcare site check`` prints the range of values it will train on."""
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fedcare.client.check import check_folder, render
from fedcare.config import RunConfig
from fedcare.errors import DataError
from fedcare.models.images import load_pixels

from sitefolders import write_toml

CT = get_testdata_file("CT_small.dcm")     # 128x128 int16, RescaleIntercept -1024: HU -896..1167
MR = get_testdata_file("MR_small.dcm")     # 64x64 int16, WindowCenter 600, WindowWidth 1600


def _hu(path):
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _window(x, center, width):   # DICOM PS3.3 C.11.2.1.2, linear
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def _pixels(path, window=None):
    size = pydicom.dcmread(path).Rows
    return load_pixels(str(path), "dicom", "grey", size, window)[0].numpy()


def test_ct_is_read_in_hounsfield_units_and_windowed():
    hu = _hu(CT)
    assert (hu.min(), hu.max()) == (-896, 1167)                  # the file's known range
    soft = _pixels(CT, (40, 400))                                # a soft-tissue window from dataset.toml
    assert np.allclose(soft, _window(hu, 40, 400), atol=1e-5)
    assert 0.05 < (soft == 0).mean() < 0.95 and (soft > 0).any()  # air black, tissue grey, not all black
    whole = _pixels(CT)                                          # no window anywhere: the file's HU range
    assert np.allclose(whole, (hu + 896) / (1167 + 896), atol=1e-5)


def test_mr_uses_the_files_own_window_and_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    raw = ds.pixel_array.astype(np.float64)
    assert np.allclose(_pixels(MR), _window(raw, 600, 1600), atol=1e-5)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mr1.dcm"
    ds.save_as(inverted)
    assert np.allclose(_pixels(inverted), 1 - _window(raw, 600, 1600), atol=1e-5)


def test_a_multi_frame_file_is_refused(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    path = tmp_path / "two.dcm"
    ds.save_as(path)
    with pytest.raises(DataError, match="multi-frame"):
        _pixels(path)


def _ct_site(root, window=""):
    folder = write_toml(root, 'dataset_id = "ct"\nfamily = "image"\nformat = "dicom"\nfiles = ["labels.csv"]\n'
                              + window)
    (folder / "ct").mkdir()
    rows = []
    for i in range(6):
        shutil.copy(CT if i % 2 else MR, folder / "ct" / f"{i}.dcm")
        rows.append({"file": f"ct/{i}.dcm", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


def test_site_check_prints_the_value_range_it_trains_on(tmp_path):
    cfg = RunConfig().apply_sets(["data.labels=a,b"])
    summary = check_folder(str(_ct_site(tmp_path / "f", '[window]\ncenter = 40\nwidth = 400\n')), "image", cfg, 1)
    assert summary["value_range"]["HU"]["min"] == -896 and summary["value_range"]["HU"]["max"] == 1167
    text = render(summary)
    assert "values: HU -896..1167, mapped to 0..1 by window center 40 width 400 (dataset.toml)" in text, text
    assert "values: modality units 127..2145, mapped" in text   # the MR files: no rescale
    plain = render(check_folder(str(_ct_site(tmp_path / "g")), "image", cfg, 1))
    assert "values: HU -896..1167, mapped to 0..1 by each file's own range (no window in the files" in plain
    assert "values: modality units 127..2145, mapped to 0..1 by each file's window" in plain


def test_stored_values_without_rescale_or_window_keep_their_bit_depth(tmp_path):
    """An 8-bit ultrasound file (no rescale, no window) reads as a PNG would: value / 255."""
    from sitefolders import breast_arrays, write_dicom

    img = breast_arrays(2)[0][0]
    write_dicom(tmp_path / "us.dcm", img, "P1")
    assert np.allclose(_pixels(tmp_path / "us.dcm"), img / 255.0, atol=1e-6)
