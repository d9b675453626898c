"""A site's images: PNG/JPEG in a folder per class (optionally under train/ and test/),
or files listed in a table (CSV/Parquet/JSONL: file, label, attributes), DICOM included.

Only paths are held in memory; each image is opened when the DataLoader asks for it
(Pillow, or pydicom for DICOM), turned into [0, 1] grey or RGB and resized to the run's
image size, so 100,000 images train in the memory of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fedcare.errors import DataError

from .sitedata import Description, Table, cells, columns_for, read_table

SUFFIXES = {"png": (".png",), "jpeg": (".jpg", ".jpeg"), "dicom": (".dcm", ".dicom")}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def image_table(desc: Description) -> tuple[Table, np.ndarray]:
    """(table with a label column and any split/sensitive columns, absolute image paths)."""
    if desc.layout == "table" or desc.format == "dicom":
        file_col = desc.column("file", "file")
        cols = list(dict.fromkeys([file_col, desc.column("label", "label")] + columns_for(desc)))
        fmt = Path(desc.files[0]).suffix.lower().lstrip(".").replace("json", "jsonl").replace("jsonll", "jsonl")
        table = read_table(desc, cols, fmt if fmt in ("csv", "parquet", "jsonl") else "csv")
        paths = np.asarray([str(desc.folder / f) for f in cells(table.columns[file_col])], dtype=object)
        return table, paths
    if desc.layout != "class-folders":
        raise DataError(f"{desc.path}: layout must be class-folders or table, got {desc.layout!r}")
    root = desc.folder / desc.column("images", ".")
    splits = [d for d in ("train", "test") if (root / d).is_dir()]
    rels, labels, split = [], [], []
    for sp in splits or [""]:
        base = root / sp if sp else root
        for cls in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in SUFFIXES[desc.format]:
                    rels.append(str(f.relative_to(desc.folder)))
                    labels.append(cls.name)
                    split.append(sp)
    if not rels:
        raise DataError(f"{root}: no {desc.format} images in class folders ({root}/<label>/*"
                        f"{SUFFIXES[desc.format][0]}, optionally under train/ and test/)")
    columns = {"label": np.asarray(labels, dtype=object)}
    if splits:
        columns["split"] = np.asarray(split, dtype=object)
        desc.columns.setdefault("split", "split")
    desc.columns.setdefault("label", "label")
    n = len(rels)
    table = Table(columns, np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int64), tuple(rels))
    return table, np.asarray([str(desc.folder / r) for r in rels], dtype=object)


@dataclass
class Header:
    width: int
    height: int
    channels: int


def read_header(path: str, fmt: str, where: str) -> Header:
    """Size and channels of one image without decoding its pixels (DataError naming the file)."""
    if not Path(path).is_file():
        raise DataError(f"{where}: image file {path} does not exist")
    if fmt == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return Header(int(ds.Columns), int(ds.Rows), int(getattr(ds, "SamplesPerPixel", 1)))
        except Exception as exc:  # pydicom raises many types for a broken file
            raise DataError(f"{where}: {path} is not a readable DICOM image: {exc}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return Header(img.width, img.height, 1 if img.mode in GREY_MODES else 3)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: {path} is not a readable image: {exc}") from None


def check_colour(header: Header, colour: str, path: str, where: str) -> None:
    if (header.channels == 1) != (colour == "grey"):
        seen = "grey" if header.channels == 1 else "colour"
        raise DataError(f"{where}: {path} is a {seen} image but dataset.toml says colour = \"{colour}\"")


def load_pixels(path: str, fmt: str, colour: str, size: int) -> torch.Tensor:
    """One image as float [C, size, size] in [0, 1] (C = 1 grey, 3 rgb)."""
    try:
        if fmt == "dicom":
            arr = _dicom_array(path)
        else:
            from PIL import Image

            with Image.open(path) as img:
                if img.mode.startswith("I") or img.mode == "F":
                    arr = np.asarray(img, dtype=np.float32)
                    arr = arr / max(float(arr.max()), 255.0 if arr.max() <= 255 else 65535.0)
                else:
                    arr = np.asarray(img.convert("L" if colour == "grey" else "RGB"), dtype=np.float32) / 255.0
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot decode the image: {exc}") from None
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)[:3]
    if colour == "grey" and x.shape[0] != 1:
        x = x.mean(0, keepdim=True)
    if colour == "rgb" and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)[0]
    return x.clamp(0, 1)


def _dicom_array(path: str) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        arr = arr[0]   # a multi-frame grey file: its first frame
    top = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
    arr = arr / top
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = 1.0 - arr
    return arr


class ImageFiles(Dataset):
    """Images opened one at a time: (pixels [C, S, S], label)."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, fmt: str, colour: str, size: int) -> None:
        self.paths, self.labels = paths, torch.as_tensor(labels, dtype=torch.long)
        self.fmt, self.colour, self.size = fmt, colour, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_pixels(self.paths[i], self.fmt, self.colour, self.size), self.labels[i]
