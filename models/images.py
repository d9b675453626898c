"""A site's images: PNG/JPEG in a folder per class (optionally under train/ and test/),
or files listed in a table (CSV/Parquet/JSONL: file, label, attributes), DICOM included.

Only paths are held in memory; each image is opened when the DataLoader asks for it
(Pillow, or pydicom for DICOM), turned into [0, 1] grey or RGB and resized to the run's
image size, so 100,000 images train in the memory of a batch.

DICOM is read in its modality's units (the modality LUT: RescaleSlope/Intercept, signed
pixels; HU for CT), then windowed to [0, 1]: by dataset.toml's ``window`` if it gives one,
else the file's VOI LUT or WindowCenter/Width, else the file's own value range.
MONOCHROME1 is inverted; a multi-frame file is refused (one image per file).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fedcare.errors import DataError, SiteProblem

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
        paths = []
        for i, f in enumerate(cells(table.columns[file_col])):
            try:
                paths.append(str(desc.inside(f, f"columns.file ({file_col})")))
            except DataError as err:
                raise DataError(f"{table.where(i)}: {err}", problem=table.problem(i, "outside-folder", file_col)) \
                    from None
        return table, np.asarray(paths, dtype=object)
    root = desc.inside(desc.column("images", "."), "columns.images")
    splits = [d for d in ("train", "test") if (root / d).is_dir()]
    rels, labels, split = [], [], []
    for sp in splits or [""]:
        base = root / sp if sp else root
        for cls in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in SUFFIXES[desc.format]:
                    rel = str(f.relative_to(desc.folder.resolve()))
                    desc.inside(rel, "an image in a class folder")
                    rels.append(rel)
                    labels.append(cls.name)
                    split.append(sp)
    if not rels:
        raise DataError(f"{root}: no {desc.format} images in class folders ({root}/<label>/*"
                        f"{SUFFIXES[desc.format][0]}, optionally under train/ and test/; images listed in a table "
                        "need files = [...] and layout = \"table\")", problem=SiteProblem("missing-file", key="layout"))
    columns = {"label": np.asarray(labels, dtype=object)}
    if splits:
        columns["split"] = np.asarray(split, dtype=object)
        desc.columns.setdefault("split", "split")
    desc.columns.setdefault("label", "label")
    n = len(rels)
    table = Table(columns, np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int64), tuple(rels), desc.folder)
    return table, np.asarray([str(desc.folder.resolve() / r) for r in rels], dtype=object)


@dataclass
class Header:
    width: int
    height: int
    channels: int


def read_header(path: str, fmt: str, where: str, problem: SiteProblem | None = None) -> Header:
    """Size and channels of one image without decoding its pixels (DataError naming the file)."""
    kind = "bad-dicom" if fmt == "dicom" else "bad-image"
    problem = problem or SiteProblem(kind)
    if not Path(path).is_file():
        raise DataError(f"{where}: image file {path} does not exist", problem=replace(problem, kind="missing-file"))
    if fmt == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return Header(int(ds.Columns), int(ds.Rows), int(getattr(ds, "SamplesPerPixel", 1)))
        except Exception as exc:  # pydicom raises many types for a broken file
            raise DataError(f"{where}: {path} is not a readable DICOM image: {exc}", problem=problem) from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return Header(img.width, img.height, 1 if img.mode in GREY_MODES else 3)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: {path} is not a readable image: {exc}", problem=problem) from None


def check_colour(header: Header, colour: str, path: str, where: str, problem: SiteProblem | None = None) -> None:
    if (header.channels == 1) != (colour == "grey"):
        seen = "grey" if header.channels == 1 else "colour"
        raise DataError(f"{where}: {path} is a {seen} image but dataset.toml says colour = \"{colour}\"",
                        problem=replace(problem or SiteProblem("bad-image"), kind="bad-image", key="colour"))


@dataclass
class Decoded:
    """One image's pixels in [0, 1] ([H, W] or [H, W, C]) and the range of the values it
    was mapped from, in ``units`` (HU for CT, the modality's units for other DICOM, the
    file's pixel values for PNG/JPEG), and how they were mapped to [0, 1]."""

    pixels: np.ndarray
    low: float
    high: float
    units: str
    mapping: str = "the bit depth"


def decode(path: str, fmt: str, colour: str, window: tuple[float, float] | None = None,
           problem: SiteProblem | None = None) -> Decoded:
    """Every pixel of one image, as training reads it (DataError with ``problem`` if not)."""
    problem = problem or SiteProblem("bad-dicom" if fmt == "dicom" else "bad-image")
    try:
        if fmt == "dicom":
            return _dicom(path, window, problem)
        from PIL import Image

        with Image.open(path) as img:
            if img.mode.startswith("I") or img.mode == "F":
                raw = np.asarray(img, dtype=np.float32)
                top = max(float(raw.max()), 255.0 if raw.max() <= 255 else 65535.0)
                return Decoded(raw / top, float(raw.min()), float(raw.max()), "pixel values")
            raw = np.asarray(img.convert("L" if colour == "grey" else "RGB"), dtype=np.float32)
            return Decoded(raw / 255.0, float(raw.min()), float(raw.max()), "pixel values")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot decode the image: {exc}", problem=problem) from None


def load_pixels(path: str, fmt: str, colour: str, size: int, window: tuple[float, float] | None = None,
                problem: SiteProblem | None = None) -> torch.Tensor:
    """One image as float [C, size, size] in [0, 1] (C = 1 grey, 3 rgb)."""
    arr = decode(path, fmt, colour, window, problem).pixels
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)[:3]
    if colour == "grey" and x.shape[0] != 1:
        x = x.mean(0, keepdim=True)
    if colour == "rgb" and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)[0]
    return x.clamp(0, 1)


def _dicom(path: str, window: tuple[float, float] | None, problem: SiteProblem) -> Decoded:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: a multi-frame DICOM file ({frames} frames); give one image per file "
                        "(e.g. one file per slice)", problem=replace(problem, kind="bad-dicom"))
    raw = ds.pixel_array
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:    # colour: no modality units
        top = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
        return Decoded(raw.astype(np.float32) / top, float(raw.min()), float(raw.max()), "pixel values")
    units = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    unit = "HU" if str(getattr(ds, "Modality", "")) == "CT" else "modality units"
    bits, signed = int(getattr(ds, "BitsStored", 8)), int(getattr(ds, "PixelRepresentation", 0)) == 1
    if window is not None:
        arr, mapping = _window(units, *window), f"window center {window[0]:g} width {window[1]:g} (dataset.toml)"
    elif "VOILUTSequence" in ds:
        voi = np.asarray(apply_voi_lut(units, ds, index=0, prefer_lut=True), dtype=np.float64)
        arr, mapping = voi / float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1), "each file's VOI LUT"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        arr, mapping = _window(units, _first(ds.WindowCenter), _first(ds.WindowWidth)), "each file's window"
    elif any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence")):
        low, high = float(units.min()), float(units.max())   # units but no window: this file's range
        arr = (units - low) / (high - low) if high > low else np.zeros_like(units)
        mapping = "each file's own range (no window in the files: give [window] in dataset.toml)"
    else:    # stored values as they are (US, 8/12-bit): the bit depth, as for PNG
        arr, mapping = (units + (2 ** (bits - 1) if signed else 0)) / float(2 ** bits - 1), "the bit depth"
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = 1.0 - arr
    return Decoded(np.clip(arr, 0.0, 1.0).astype(np.float32), float(units.min()), float(units.max()), unit,
                   mapping)


def _first(value) -> float:
    """A DICOM value that may hold several (then the first)."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def _window(units: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window (PS3.3 C.11.2.1.2): values below center - width/2 are 0, above 1."""
    return np.clip((units - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)


class ImageFiles(Dataset):
    """Images opened one at a time: (pixels [C, S, S], label)."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, fmt: str, colour: str, size: int,
                 window: tuple[float, float] | None = None, names: np.ndarray | None = None) -> None:
        self.paths, self.labels = paths, torch.as_tensor(labels, dtype=torch.long)
        self.fmt, self.colour, self.size, self.window = fmt, colour, size, window
        self.names = names    # relative to the site's folder: what an error may say outside the site

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        kind = "bad-dicom" if self.fmt == "dicom" else "bad-image"
        problem = SiteProblem(kind, str(self.names[i]) if self.names is not None else "")
        return load_pixels(self.paths[i], self.fmt, self.colour, self.size, self.window, problem), self.labels[i]
