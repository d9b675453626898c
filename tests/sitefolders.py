"""Realistic hospital data folders written from the bundled data, in the formats sites
export, each with its dataset.toml: used by the site-data tests, the family simulations,
the deployed text e2e test and bench/site_data.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedcare.models.data import bundled_dir

ABSTRACT_LABELS = ("neoplasms", "digestive system diseases", "nervous system diseases",
                   "cardiovascular diseases", "general pathological conditions")
BREAST_LABELS = ("malignant", "benign/normal")


def abstracts_frame() -> pd.DataFrame:
    folder = bundled_dir("medical-abstracts")
    df = pd.read_csv(folder / "medical_tc_test.csv")
    names = pd.read_csv(folder / "medical_tc_labels.csv").set_index("condition_label")["condition_name"]
    assert tuple(names.sort_index()) == ABSTRACT_LABELS
    return df.assign(condition=df["condition_label"].map(names))


def write_toml(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.toml").write_text(text.strip() + "\n")
    return folder


def abstracts_sites(root: Path, per_site: int = 40, seed: int = 0) -> list[Path]:
    """Three hospitals' abstracts: a CSV (own column names), a JSONL and a Parquet."""
    df = abstracts_frame().sample(n=3 * per_site, random_state=seed).reset_index(drop=True)
    parts = [df.iloc[i * per_site:(i + 1) * per_site] for i in range(3)]
    a = write_toml(root / "hospital-a", '''
dataset_id = "hospital-a/abstracts-2024"
family = "text"
format = "csv"
files = ["abstracts.csv"]
[columns]
text = "abstract_text"
label = "diagnosis_group"
id = "report_id"
''')
    parts[0].rename(columns={"medical_abstract": "abstract_text", "condition": "diagnosis_group"}).assign(
        report_id=[f"A{i}" for i in range(per_site)])[["report_id", "diagnosis_group", "abstract_text"]].to_csv(
        a / "abstracts.csv", index=False)
    b = write_toml(root / "hospital-b", '''
dataset_id = "hospital-b/notes"
family = "text"
format = "jsonl"
files = ["notes.jsonl"]
[columns]
text = "text"
label = "label"
''')
    with open(b / "notes.jsonl", "w", encoding="utf-8") as fh:
        for _, r in parts[1].iterrows():
            fh.write(json.dumps({"text": r["medical_abstract"], "label": r["condition"]}) + "\n")
    c = write_toml(root / "hospital-c", '''
dataset_id = "hospital-c/abstracts"
family = "text"
format = "parquet"
files = ["part-0.parquet", "part-1.parquet"]
[columns]
text = "body"
label = "category"
split = "split"
''')
    pc = parts[2].rename(columns={"medical_abstract": "body", "condition": "category"})[["category", "body"]]
    pc = pc.assign(split=np.where(np.arange(len(pc)) % 4 == 0, "test", "train"))
    half = len(pc) // 2
    pc.iloc[:half].to_parquet(c / "part-0.parquet")
    pc.iloc[half:].to_parquet(c / "part-1.parquet")
    return [a, b, c]


def breast_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with np.load(bundled_dir("breastmnist") / "breastmnist.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"].reshape(-1)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == k), n // 2, replace=False) for k in (0, 1)])
    return images[idx], labels[idx]


BREAST_TOML = '''
dataset_id = "{id}"
family = "image"
format = "{fmt}"
colour = "grey"
{extra}
[label_values]
benign = "benign/normal"
'''


def breast_png(root: Path, n: int = 16, seed: int = 0, upscale: int = 2) -> Path:
    """PNG class folders under train/ and test/ (malignant/, benign/), images upscaled."""
    from PIL import Image

    images, labels = breast_arrays(n, seed)
    folder = write_toml(root, BREAST_TOML.format(id="breast-us-png", fmt="png", extra='layout = "class-folders"'))
    for i, (img, y) in enumerate(zip(images, labels)):
        split = "test" if i % 4 == 0 else "train"
        d = folder / split / ("malignant" if y == 0 else "benign")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((28 * upscale, 28 * upscale)).save(d / f"us_{i:05d}.png")
    return folder


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str) -> None:
    """A minimal valid grey ultrasound DICOM file (uncompressed, 8 bits)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "US"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def breast_dicom(root: Path, n: int = 16, seed: int = 1) -> Path:
    """DICOM files in one folder and a labels.csv (file, finding, patient sex/age)."""
    images, labels = breast_arrays(n, seed)
    folder = write_toml(root, BREAST_TOML.format(id="breast-us-dicom", fmt="dicom", extra='files = ["labels.csv"]')
                        + '[columns]\nfile = "path"\nlabel = "finding"\n[sensitive]\nage_band = { column = "age", bands = [40, 60] }\n')
    (folder / "dicom").mkdir(exist_ok=True)
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        name = f"dicom/img_{i:05d}.dcm"
        write_dicom(folder / name, img, f"P{i:05d}")
        rows.append({"path": name, "finding": "malignant" if y == 0 else "benign", "age": 30 + (i * 7) % 45})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


HEART_TOML = '''
dataset_id = "{id}"
family = "tabular"
format = "parquet"
files = ["records.parquet"]
[columns]
label = "num"
id = "patient_id"
[label_values]
0 = "no disease"
1 = "disease"
2 = "disease"
3 = "disease"
4 = "disease"
[sensitive]
sex = {{ column = "sex", values = {{ "1" = "male", "0" = "female" }} }}
age_band = {{ column = "age", bands = [50, 60] }}
[split]
test_fraction = 0.34
seed = 43
'''


def heart_parquet(root: Path, centre: str = "processed.cleveland.data", dataset_id: str = "cleveland") -> Path:
    """A heart-disease centre as Parquet: extra columns (patient id, ward), reversed order."""
    from fedcare.models.heart_disease import COLUMNS, DROPPED, read_centre_file

    raw = read_centre_file(bundled_dir("heart-disease") / centre)
    cols = [c for c in COLUMNS if c not in DROPPED]
    df = pd.DataFrame(raw, columns=cols).assign(patient_id=[f"P{i:04d}" for i in range(len(raw))], ward="cardiology")
    folder = write_toml(root, HEART_TOML.format(id=dataset_id))
    df[["ward", "patient_id"] + cols[::-1]].to_parquet(folder / "records.parquet")
    return folder


def instruct_sites(root: Path, per_site: int = 12, seed: int = 0) -> list[Path]:
    """Two hospitals' instruction data from the abstracts: prompt/response JSONL and chat messages."""
    df = abstracts_frame().sample(n=2 * per_site, random_state=seed).reset_index(drop=True)
    q = "Which condition category does this abstract describe?\n\n"
    a = write_toml(root / "hospital-a", '''
dataset_id = "hospital-a/qa"
family = "instruct"
format = "jsonl"
files = ["qa.jsonl"]
[columns]
prompt = "question"
response = "answer"
''')
    with open(a / "qa.jsonl", "w", encoding="utf-8") as fh:
        for _, r in df.iloc[:per_site].iterrows():
            fh.write(json.dumps({"question": q + r["medical_abstract"][:300], "answer": r["condition"]}) + "\n")
    b = write_toml(root / "hospital-b", '''
dataset_id = "hospital-b/chats"
family = "instruct"
format = "jsonl"
files = ["chats.jsonl"]
[columns]
messages = "messages"
''')
    with open(b / "chats.jsonl", "w", encoding="utf-8") as fh:
        for _, r in df.iloc[per_site:].iterrows():
            fh.write(json.dumps({"messages": [{"role": "user", "content": q + r["medical_abstract"][:300]},
                                              {"role": "assistant", "content": r["condition"]}]}) + "\n")
    return [a, b]
