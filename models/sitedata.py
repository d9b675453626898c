"""A site's own data: the ``dataset.toml`` that describes it, the run's data contract,
and the table reader shared by every task family.

A hospital keeps its files as they are and writes one small ``dataset.toml`` beside them
(docs/data.md shows one per family). Tables (CSV, Parquet, JSONL) are read with pyarrow,
only the columns the description names, file by file, so every error names the file and
the row. Nothing here leaves the site: the summary of ``fedcare site check`` and the
training split are computed from these readers at the site.
"""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.compat import tomllib
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError, SiteProblem

DESCRIPTION = "dataset.toml"
FAMILIES = ("tabular", "text", "image", "instruct")
TABLE_FORMATS = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}
IMAGE_FORMATS = ("png", "jpeg", "dicom")
SPLITS = ("train", "test")
LAYOUTS = ("class-folders", "table")

#: every key dataset.toml may hold (a table's keys under its name; None: any key, e.g. a label value)
SCHEMA: dict[str, Any] = {
    "dataset_id": None, "family": None, "format": None, "files": None, "labels": None, "missing": None,
    "colour": None, "color": None, "layout": None,
    "columns": {"label": None, "text": None, "id": None, "split": None, "file": None, "images": None,
                "prompt": None, "response": None, "messages": None},
    "features": "any", "label_values": "any", "sensitive": "any",
    "split": {"test_fraction": None, "seed": None, "column": None},
    "window": {"center": None, "width": None},
}
SENSITIVE_KEYS = ("column", "bands", "values")
FEATURE_KEYS = ("column", "values")


# ----------------------------------------------------------------------------- contract
#: the bundled presets' label names in label order (their data contracts' labels)
PRESET_LABELS = {"heart-disease": ("no disease", "disease"), "heart-disease-virtual": ("no disease", "disease"),
                 "breastmnist": ("malignant", "benign/normal")}


def label_names(task: str, labels: str = "") -> tuple[str, ...]:
    """A run's label names in order (what "class k" of its fairness numbers is): its
    ``data.labels``, else its preset's (medical-abstracts' and medical-llm's five
    conditions from the bundled label file), else ()."""
    named = tuple(x.strip() for x in labels.split(",") if x.strip())
    if named or task in PRESET_LABELS:
        return named or PRESET_LABELS[task]
    if task in ("medical-abstracts", "medical-llm"):
        from .data import bundled_dir

        try:
            with open(bundled_dir("medical-abstracts") / "medical_tc_labels.csv", newline="", encoding="utf-8") as fh:
                rows = sorted(csv.DictReader(fh), key=lambda r: int(r["condition_label"]))
        except (OSError, KeyError, ValueError):
            return ()
        return tuple(r["condition_name"] for r in rows)
    return ()


@dataclass(frozen=True)
class Feature:
    name: str
    levels: tuple[str, ...] = ()     # () = numeric; else categorical, one-hot with the first level dropped

    @property
    def width(self) -> int:
        return len(self.levels) - 1 if self.levels else 1


@dataclass(frozen=True)
class Contract:
    """What every site of a run must agree on; fixed by the coordinator's run config."""

    labels: tuple[str, ...] = ()
    features: tuple[Feature, ...] = ()
    image_size: int = 64
    text_length: int = 128
    prompt_template: str = "{prompt}"

    @classmethod
    def from_config(cls, cfg: RunConfig, preset: "Contract | None" = None) -> "Contract":
        base = preset or cls()
        d = cfg.data
        labels = tuple(x.strip() for x in d.labels.split(",") if x.strip()) or base.labels
        features = parse_features(d.features) or base.features
        template = d.prompt_template or base.prompt_template
        if "{prompt}" not in template:
            raise ConfigError(f"data.prompt_template must contain {{prompt}}, got {template!r}")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"data.labels names a label twice: {', '.join(labels)}")
        return cls(labels, features, d.image_size or base.image_size, d.text_length or base.text_length, template)

    def need_labels(self, family: str) -> tuple[str, ...]:
        if len(self.labels) < 2 and family != "instruct":
            raise ConfigError(f"{'an' if family[:1] in 'aeiou' else 'a'} {family} run needs data.labels: "
                              "the label names in order, comma-separated "
                              "(the run's data contract)")
        return self.labels


def parse_features(text: str) -> tuple[Feature, ...]:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, levels = item.partition("=")
        levels_t = tuple(v.strip() for v in levels.split("|") if v.strip()) if sep else ()
        if sep and len(levels_t) < 2:
            raise ConfigError(f"data.features: categorical feature {name!r} needs at least two levels (a|b)")
        out.append(Feature(name.strip(), levels_t))
    return tuple(out)


# ----------------------------------------------------------------------------- description
@dataclass(frozen=True)
class Band:
    """A sensitive attribute: a column, optionally banded (numeric edges) or renamed values."""

    column: str
    edges: tuple[float, ...] = ()
    values: tuple[tuple[str, str], ...] = ()

    def group(self, raw: np.ndarray) -> np.ndarray:
        if self.edges:
            x = np.asarray(raw, dtype=float)
            names = [f"<{self.edges[0]:g}"] + [f"{a:g}-{b - 1:g}" for a, b in zip(self.edges, self.edges[1:])] \
                + [f"{self.edges[-1]:g}+"]
            out = np.asarray(names, dtype=object)[np.searchsorted(self.edges, x, side="right")]
            return np.where(np.isnan(x), "missing", out).astype(str)
        mapping = dict(self.values)
        distinct, inverse = np.unique(cells(raw).astype(str), return_inverse=True)
        return np.asarray([mapping.get(v, v) or "missing" for v in distinct], dtype=str)[inverse]


@dataclass(frozen=True)
class Description:
    folder: Path
    family: str
    dataset_id: str
    format: str
    files: tuple[str, ...] = ()
    columns: dict[str, str] = field(default_factory=dict)     # role -> column (label, text, id, split, file...)
    features: dict[str, str] = field(default_factory=dict)    # contract feature -> column at this site
    feature_values: dict[str, dict[str, str]] = field(default_factory=dict)  # feature -> {site code: level}
    labels: tuple[str, ...] = ()
    label_values: dict[str, str] = field(default_factory=dict)  # raw value -> label name
    sensitive: dict[str, Band] = field(default_factory=dict)
    test_fraction: float = 0.2
    seed: int = 42
    colour: str = "grey"
    layout: str = "class-folders"
    missing: tuple[str, ...] = ()
    window: tuple[float, float] | None = None    # DICOM (center, width) when the files give none

    def inside(self, name: str, what: str = "files") -> Path:
        """``name`` (relative to the folder) resolved, symlinks followed; a DataError if it
        leaves the folder (``..``, an absolute path, a link pointing elsewhere)."""
        root = self.folder.resolve()
        target = (root / str(name)).resolve()
        if target != root and root not in target.parents:
            raise DataError(f"{self.path}: {what} names {name}, which resolves to {target}, outside the site's "
                            f"folder {root}; every file must be inside it",
                            problem=SiteProblem("outside-folder", key=what))
        return target

    @property
    def path(self) -> Path:
        return self.folder / DESCRIPTION

    def column(self, role: str, default: str = "") -> str:
        return self.columns.get(role, default)


def site_paths(text: str) -> dict[str, str]:
    """``data.site_paths`` ("a=/data/a,b=/data/b"): virtual site name -> its own folder."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, folder = (v.strip() for v in item.partition("="))
        if not (sep and name and folder):
            raise ConfigError(f"a simulated site is NAME=FOLDER (fedcare simulate --site), got {item!r}")
        if name in out:
            raise ConfigError(f"simulated site {name} is given twice")
        out[name] = folder
    return out


def has_description(folder: str | Path) -> bool:
    return bool(folder) and (Path(folder) / DESCRIPTION).is_file()


def describe(folder: str | Path) -> Description:
    """Parse and check ``dataset.toml`` in ``folder`` (DataError naming the key on a problem)."""
    folder = Path(folder)
    path = folder / DESCRIPTION
    if not path.is_file():
        raise DataError(f"{folder} has no {DESCRIPTION}: describe the data in one (docs/data.md shows one per family)",
                        problem=SiteProblem("missing-file", DESCRIPTION))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path}: not valid TOML: {exc}", problem=SiteProblem("description", DESCRIPTION)) from None

    def bad(msg: str, key: str) -> DataError:
        return DataError(f"{path}: {msg}", problem=SiteProblem("description", DESCRIPTION, key=key))

    try:
        return _described(path, raw, bad)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:    # e.g. test_fraction = "a fifth"
        raise DataError(f"{path}: a value has the wrong type ({exc}); docs/data.md shows what each key takes",
                        problem=SiteProblem("description", DESCRIPTION)) from None


def _described(path: Path, raw: dict, bad) -> Description:
    check_schema(raw, bad)
    for key in ("files", "labels", "missing"):
        if not isinstance(raw.get(key, []), list):
            raise bad(f"{key} must be a list, e.g. {key} = [\"...\"]", key)
    family, fmt = str(raw.get("family", "")), str(raw.get("format", "")).lower()
    if family not in FAMILIES:
        raise bad(f"family must be one of {', '.join(FAMILIES)}, got {family!r}", "family")
    allowed = IMAGE_FORMATS if family == "image" else tuple(TABLE_FORMATS)
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in allowed:
        raise bad(f"format for a {family} dataset must be one of {', '.join(allowed)}, "
                  + (f"got {fmt!r}" if fmt else "but format is missing"), "format")
    if not str(raw.get("dataset_id", "")).strip():
        raise bad("dataset_id is missing: a stable name for these records (the privacy ledger charges it)",
                  "dataset_id")
    split = raw.get("split", {})
    sensitive = {}
    for name, spec in raw.get("sensitive", {}).items():
        spec = {"column": spec} if isinstance(spec, str) else dict(spec)
        _known_keys(spec, SENSITIVE_KEYS, f"sensitive.{name}", bad)
        edges = tuple(float(e) for e in spec.get("bands", ()))
        if list(edges) != sorted(edges):
            raise bad(f"sensitive.{name}.bands must be increasing, got {list(edges)}", f"sensitive.{name}.bands")
        sensitive[name] = Band(str(spec.get("column", name)), edges,
                               tuple((str(k), str(v)) for k, v in spec.get("values", {}).items()))
    features, feature_values = {}, {}
    for name, spec in raw.get("features", {}).items():
        spec = {"column": spec} if isinstance(spec, str) else dict(spec)
        _known_keys(spec, FEATURE_KEYS, f"features.{name}", bad)
        features[str(name)] = str(spec.get("column", name))
        if "values" in spec:
            feature_values[str(name)] = {_cell(k): str(v) for k, v in dict(spec["values"]).items()}
    files = tuple(str(f) for f in raw.get("files", ()))
    layout = str(raw.get("layout", "table" if family == "image" and (files or fmt == "dicom") else "class-folders"))
    window = raw.get("window")
    desc = Description(
        folder=path.parent, family=family, dataset_id=str(raw["dataset_id"]).strip(), format=fmt,
        files=files,
        columns={str(k): str(v) for k, v in raw.get("columns", {}).items()},
        features=features, feature_values=feature_values,
        labels=tuple(str(x) for x in raw.get("labels", ())),
        label_values={_cell(k): str(v) for k, v in raw.get("label_values", {}).items()},
        sensitive=sensitive,
        test_fraction=float(split.get("test_fraction", 0.2)), seed=int(split.get("seed", 42)),
        colour=str(raw.get("colour", raw.get("color", "grey"))), layout=layout,
        missing=tuple(str(x) for x in raw.get("missing", ())),
        window=(float(window["center"]), float(window["width"])) if window else None,
    )
    if "column" in split:
        desc.columns.setdefault("split", str(split["column"]))
    if desc.colour not in ("grey", "rgb"):
        raise bad(f"colour must be grey or rgb, got {desc.colour!r}", "colour")
    if family == "image" and layout not in LAYOUTS:
        raise bad(f"layout must be {' or '.join(LAYOUTS)}, got {layout!r}", "layout")
    if window is not None and not ({"center", "width"} <= set(window) and float(window["width"]) > 0):
        raise bad("window needs center and width > 0 (in the modality's units, e.g. HU)", "window")
    if not 0 < desc.test_fraction < 1:
        raise bad(f"split.test_fraction must be in (0, 1), got {desc.test_fraction}", "split.test_fraction")
    if family != "image" or desc.layout == "table" or fmt == "dicom":
        if not desc.files:
            raise bad("files is missing: the table file(s) to read, e.g. files = [\"records.csv\"]", "files")
        for f in desc.files:
            if not desc.inside(f).is_file():
                raise DataError(f"{path}: files names {f}, which is not in {desc.folder}",
                                problem=SiteProblem("missing-file", key="files"))
    elif "images" in desc.columns:
        desc.inside(desc.columns["images"], "columns.images")
    return desc


def check_schema(raw: dict, bad) -> None:
    """Every key of dataset.toml is one docs/data.md describes (else: the closest known key)."""
    _known_keys(raw, tuple(SCHEMA), "", bad)
    for key, sub in SCHEMA.items():
        if isinstance(sub, dict) and key in raw:
            if not isinstance(raw[key], dict):
                raise bad(f"{key} must be a table ([{key}]), got {type(raw[key]).__name__}", key)
            _known_keys(raw[key], tuple(sub), key, bad)


def _known_keys(table: dict, known: tuple[str, ...], where: str, bad) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
            # the key that leaves is a known one (the unknown key itself is the site's text)
            raise bad(f"unknown key {name}; {hint} (docs/data.md lists every key)",
                      where or (close[0] if close else ""))


def check_labels(desc: Description, contract: Contract) -> None:
    """The description's own label list, if it gives one, must be the run's (names and order)."""
    if desc.labels and contract.labels and desc.labels != contract.labels:
        raise DataError(f"{desc.path}: labels {list(desc.labels)} differ from the run's data contract "
                        f"{list(contract.labels)} (names and order must match)",
                        problem=SiteProblem("contract", DESCRIPTION, key="labels"))


# ----------------------------------------------------------------------------- tables
@dataclass
class Table:
    """Columns of a site's table files (numpy object/float arrays), with where each row came from."""

    columns: dict[str, np.ndarray]
    file: np.ndarray      # index into ``names`` per row
    row: np.ndarray       # 1-based row (record) within its file
    names: tuple[str, ...]
    folder: Path | None = None    # where ``names`` are (to find a CSV record's line)
    _starts: dict[str, list[int]] = field(default_factory=dict, repr=False)   # file -> line of each record

    def __len__(self) -> int:
        return len(self.file)

    def line(self, i: int) -> int:
        """The 1-based line of the file where row ``i`` starts (0: a file per row). A CSV
        record may span lines (a quoted field with line breaks); a JSONL file may hold
        blank lines; a Parquet file has rows, not lines (its row number)."""
        name, row = self.names[self.file[i]], int(self.row[i])
        if row == 0 or self.folder is None or not name.endswith((".csv", ".jsonl")):
            return row
        if name not in self._starts:    # read once per file, when a message first needs it
            self._starts[name] = _record_lines(self.folder / name, name.endswith(".csv"))
        starts = self._starts[name]
        return starts[row - 1] if row - 1 < len(starts) else row

    def where(self, i: int) -> str:
        name, line = self.names[self.file[i]], self.line(i)
        if line == 0:    # one row per file (an image in a class folder)
            return name
        return f"{name} line {line}" if name.endswith((".csv", ".jsonl")) else f"{name} row {line}"

    def problem(self, i: int, kind: str, column: str = "") -> SiteProblem:
        """Row ``i``'s problem in words that may leave the site."""
        return SiteProblem(kind, self.names[self.file[i]], self.line(i), column)


def _record_lines(path: Path, is_csv: bool) -> list[int]:
    """The line on which each data record of a CSV (after its header) or JSONL file starts."""
    starts = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        if not is_csv:
            return [n for n, text in enumerate(fh, 1) if text.strip()]
        reader, last, header = csv.reader(fh), 0, False
        for record in reader:
            if record:    # pyarrow skips blank lines too
                if header:
                    starts.append(last + 1)
                header = True
            last = reader.line_num
    return starts


def read_table(desc: Description, columns: list[str], fmt: str = "") -> Table:
    """The named columns of every file of ``desc`` (each must have all of them)."""
    parts, files, rows = {c: [] for c in columns}, [], []
    for k, name in enumerate(desc.files):
        table = _read_file(desc, name, columns, fmt or desc.format)
        for c in columns:
            parts[c].append(table.column(c).to_numpy(zero_copy_only=False))
        files.append(np.full(table.num_rows, k, dtype=np.int32))
        rows.append(np.arange(1, table.num_rows + 1, dtype=np.int64))
    cat = {c: (np.concatenate(v) if v else np.zeros(0, dtype=object)) for c, v in parts.items()}
    return Table(cat, np.concatenate(files), np.concatenate(rows), desc.files, desc.folder)


def _read_file(desc: Description, name: str, columns: list[str], file_format: str):
    import pyarrow as pa
    import pyarrow.dataset as ds

    path = desc.inside(name)
    fmt = {"csv": "csv", "parquet": "parquet", "jsonl": "json"}[file_format]
    try:
        if fmt == "csv":
            import pyarrow.csv as pcsv

            conv = pcsv.ConvertOptions(null_values=["", "NA", "NaN", "nan", "null", *desc.missing],
                                       strings_can_be_null=True)
            fmt = ds.CsvFileFormat(convert_options=conv)
        dataset = ds.dataset(str(path), format=fmt)
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} ({named_by(desc, missing[0])}); "
                            f"the file has {', '.join(dataset.schema.names)}",
                            problem=SiteProblem("missing-column", name, column=missing[0]))
        table = dataset.to_table(columns=columns)   # scanned in batches, only these columns
        if any(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in table.schema.types):
            raise pa.ArrowInvalid("a column holds bytes that are not UTF-8 text")
        return table
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        line = first_bad_utf8_line(path) if file_format in ("csv", "jsonl") else None
        if line:
            raise DataError(f"{path} line {line}: not UTF-8 text; save the file as UTF-8",
                            problem=SiteProblem("not-utf8", name, line)) from None
        kind = "bad-json" if file_format == "jsonl" else "unreadable-table"
        raise DataError(f"{path}: cannot read it as {file_format} (as dataset.toml describes it): "
                        f"{str(exc).splitlines()[0]}", problem=SiteProblem(kind, name)) from None


def named_by(desc: Description, column: str) -> str:
    """Who names ``column``: dataset.toml, or the run's data contract (a feature or role by default)."""
    named = set(desc.columns.values()) | set(desc.features.values()) | {b.column for b in desc.sensitive.values()}
    return "dataset.toml names it" if column in named else "the run's data contract names it; map it to " \
        "this site's column in dataset.toml"


def first_bad_utf8_line(path: Path) -> int | None:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def _cell(v: Any) -> str:
    """A label or group value as text: 1.0 -> "1" (CSV and Parquet may type the same value apart)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return "" if v is None else str(v)


def cells(values: np.ndarray) -> np.ndarray:
    """``_cell`` of every value ("" where missing), computed once per distinct value."""
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
    names = np.asarray([_cell(u) for u in uniques] + [""], dtype=object)
    return names[codes]


def is_missing(values: np.ndarray) -> np.ndarray:
    import pandas as pd

    return np.asarray(pd.isna(pd.Series(values, dtype=object)), dtype=bool)


# ----------------------------------------------------------------------------- labels, splits, groups
@dataclass
class Labelled:
    """Rows of a site with their label index, split and sensitive groups."""

    table: Table
    y: np.ndarray                      # label index into the contract's labels
    train: np.ndarray                  # row indices
    test: np.ndarray
    groups: dict[str, np.ndarray]      # attribute -> group per row (all rows)
    dropped: int = 0                   # rows left out for a missing value


def label_rows(desc: Description, contract: Contract, table: Table, keep: np.ndarray | None = None) -> Labelled:
    """Map labels to the contract, split train/test, band sensitive attributes.
    ``keep``: rows usable (False = a missing value); the label itself must be present."""
    check_labels(desc, contract)
    names = contract.labels
    text = cells(table.columns[desc.column("label", "label")])
    index = {n: i for i, n in enumerate(names)}
    values, inverse = np.unique(text.astype(str), return_inverse=True)
    codes = np.asarray([index.get(desc.label_values.get(v, v), -1) for v in values], dtype=np.int64)
    y = codes[inverse]
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        col = desc.column("label", "label")
        if not text[i]:
            raise DataError(f"{table.where(i)}: the label ({col}) is empty", problem=table.problem(i, "empty-value", col))
        raise DataError(f"{table.where(i)}: unknown label {str(text[i])!r}; the run's labels are {', '.join(names)}"
                        + (" (map values to names with [label_values] in dataset.toml)" if names else ""),
                        problem=table.problem(i, "unknown-label", col))
    return finish(desc, table, y, keep)


def finish(desc: Description, table: Table, y: np.ndarray, keep: np.ndarray | None = None) -> Labelled:
    """Duplicate ids, the train/test split and sensitive groups of labelled rows."""
    id_col = desc.column("id")
    if id_col:
        check_unique(table.columns[id_col], table, f"id column {id_col!r}", id_col)
    rows = np.arange(len(table)) if keep is None else np.flatnonzero(keep)
    split_col = desc.column("split")
    if split_col:
        values = np.char.lower(np.char.strip(cells(table.columns[split_col]).astype(str)))
        bad = np.flatnonzero(~np.isin(values, SPLITS))
        if len(bad):
            raise DataError(f"{table.where(bad[0])}: split column {split_col!r} is {str(values[bad[0]])!r}; "
                            "use train or test", problem=table.problem(bad[0], "bad-split", split_col))
        train, test = rows[values[rows] == "train"], rows[values[rows] == "test"]
    else:
        train, test = seeded_split(y[rows], desc.test_fraction, desc.seed)
        train, test = rows[train], rows[test]
    for name, idx in (("train", train), ("test", test)):
        if len(idx) == 0:
            raise DataError(f"{desc.folder}: the {name} split is empty ({len(rows)} usable rows in "
                            f"{', '.join(table.names[:5])}); give it rows or change [split]",
                            problem=SiteProblem("empty-split", key="split"))
    groups = {attr: band.group(table.columns[band.column]) for attr, band in desc.sensitive.items()}
    return Labelled(table, y, train, test, groups, dropped=len(table) - len(rows))


def check_unique(values: np.ndarray, table: Table, what: str, column: str = "") -> None:
    import pandas as pd

    keys = pd.Series(cells(values))
    dup = np.flatnonzero(keys.duplicated().to_numpy())
    if len(dup):
        i = int(dup[0])
        first = int(np.flatnonzero((keys == keys[i]).to_numpy())[0])
        raise DataError(f"{table.where(i)}: duplicate {what} value {str(keys[i])!r} (also at {table.where(first)})",
                        problem=table.problem(i, "duplicate", column))


def seeded_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) positions, stratified when every class has at least 2 rows."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if len(idx) < 2:
        return idx, idx[:0]
    _, counts = np.unique(y, return_counts=True)
    n_test = int(np.ceil(test_fraction * len(y)))
    fits = min(n_test, len(y) - n_test) >= len(counts)
    stratify = y if len(counts) > 1 and (counts >= 2).all() and fits else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(te)


def columns_for(desc: Description, *roles: str) -> list[str]:
    """The columns to read: the given roles that the description names, the sensitive ones, id and split."""
    cols = [desc.column(r, r if r in ("label", "text") else "") for r in roles]
    cols += [desc.column("id"), desc.column("split")] + [b.column for b in desc.sensitive.values()]
    return list(dict.fromkeys(c for c in cols if c))
