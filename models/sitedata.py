"""A site's own data: the ``dataset.toml`` that describes it, the run's data contract,
and the table reader shared by every task family.

A hospital keeps its files as they are and writes one small ``dataset.toml`` beside them
(docs/data.md shows one per family). Tables (CSV, Parquet, JSONL) are read with pyarrow,
only the columns the description names, file by file, so every error names the file and
the row. Nothing here leaves the site: the summary of ``fedcare site check`` and the
training split are computed from these readers at the site.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError

DESCRIPTION = "dataset.toml"
FAMILIES = ("tabular", "text", "image", "instruct")
TABLE_FORMATS = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}
IMAGE_FORMATS = ("png", "jpeg", "dicom")
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- contract
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
            raise ConfigError(f"a {family} run needs data.labels: the label names in order, comma-separated "
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
    labels: tuple[str, ...] = ()
    label_values: dict[str, str] = field(default_factory=dict)  # raw value -> label name
    sensitive: dict[str, Band] = field(default_factory=dict)
    test_fraction: float = 0.2
    seed: int = 42
    colour: str = "grey"
    layout: str = "class-folders"
    missing: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.folder / DESCRIPTION

    def column(self, role: str, default: str = "") -> str:
        return self.columns.get(role, default)


def has_description(folder: str | Path) -> bool:
    return bool(folder) and (Path(folder) / DESCRIPTION).is_file()


def describe(folder: str | Path) -> Description:
    """Parse and check ``dataset.toml`` in ``folder`` (DataError naming the key on a problem)."""
    folder = Path(folder)
    path = folder / DESCRIPTION
    if not path.is_file():
        raise DataError(f"{folder} has no {DESCRIPTION}: describe the data in one (docs/data.md shows one per family)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path}: not valid TOML: {exc}") from None

    def bad(msg: str) -> DataError:
        return DataError(f"{path}: {msg}")

    family, fmt = str(raw.get("family", "")), str(raw.get("format", "")).lower()
    if family not in FAMILIES:
        raise bad(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    allowed = IMAGE_FORMATS if family == "image" else tuple(TABLE_FORMATS)
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in allowed:
        raise bad(f"format for a {family} dataset must be one of {', '.join(allowed)}, got {fmt!r}")
    if not str(raw.get("dataset_id", "")).strip():
        raise bad("dataset_id is missing: a stable name for these records (the privacy ledger charges it)")
    split = raw.get("split", {})
    sensitive = {}
    for name, spec in raw.get("sensitive", {}).items():
        spec = {"column": spec} if isinstance(spec, str) else dict(spec)
        edges = tuple(float(e) for e in spec.get("bands", ()))
        if list(edges) != sorted(edges):
            raise bad(f"sensitive.{name}.bands must be increasing, got {list(edges)}")
        sensitive[name] = Band(str(spec.get("column", name)), edges,
                               tuple((str(k), str(v)) for k, v in spec.get("values", {}).items()))
    desc = Description(
        folder=path.parent, family=family, dataset_id=str(raw["dataset_id"]).strip(), format=fmt,
        files=tuple(str(f) for f in raw.get("files", ())),
        columns={str(k): str(v) for k, v in raw.get("columns", {}).items()},
        features={str(k): str(v) for k, v in raw.get("features", {}).items()},
        labels=tuple(str(x) for x in raw.get("labels", ())),
        label_values={_cell(k): str(v) for k, v in raw.get("label_values", {}).items()},
        sensitive=sensitive,
        test_fraction=float(split.get("test_fraction", 0.2)), seed=int(split.get("seed", 42)),
        colour=str(raw.get("colour", raw.get("color", "grey"))), layout=str(raw.get("layout", "class-folders")),
        missing=tuple(str(x) for x in raw.get("missing", ())),
    )
    if "column" in split:
        desc.columns.setdefault("split", str(split["column"]))
    if desc.colour not in ("grey", "rgb"):
        raise bad(f"colour must be grey or rgb, got {desc.colour!r}")
    if not 0 < desc.test_fraction < 1:
        raise bad(f"split.test_fraction must be in (0, 1), got {desc.test_fraction}")
    if family != "image" or desc.layout == "table" or fmt == "dicom":
        if not desc.files:
            raise bad("files is missing: the table file(s) to read, e.g. files = [\"records.csv\"]")
        for f in desc.files:
            if not (desc.folder / f).is_file():
                raise bad(f"files names {f}, which is not in {desc.folder}")
    return desc


def check_labels(desc: Description, contract: Contract) -> None:
    """The description's own label list, if it gives one, must be the run's (names and order)."""
    if desc.labels and contract.labels and desc.labels != contract.labels:
        raise DataError(f"{desc.path}: labels {list(desc.labels)} differ from the run's data contract "
                        f"{list(contract.labels)} (names and order must match)")


# ----------------------------------------------------------------------------- tables
@dataclass
class Table:
    """Columns of a site's table files (numpy object/float arrays), with where each row came from."""

    columns: dict[str, np.ndarray]
    file: np.ndarray      # index into ``names`` per row
    row: np.ndarray       # 1-based row within its file
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.file)

    def where(self, i: int) -> str:
        name = self.names[self.file[i]]
        if self.row[i] == 0:    # one row per file (an image in a class folder)
            return name
        if name.endswith(".csv"):     # the header is line 1
            return f"{name} line {self.row[i] + 1}"
        return f"{name} line {self.row[i]}" if name.endswith(".jsonl") else f"{name} row {self.row[i]}"


def read_table(desc: Description, columns: list[str], fmt: str = "") -> Table:
    """The named columns of every file of ``desc`` (each must have all of them)."""
    parts, files, rows = {c: [] for c in columns}, [], []
    for k, name in enumerate(desc.files):
        table = _read_file(desc, desc.folder / name, columns, fmt or desc.format)
        for c in columns:
            parts[c].append(table.column(c).to_numpy(zero_copy_only=False))
        files.append(np.full(table.num_rows, k, dtype=np.int32))
        rows.append(np.arange(1, table.num_rows + 1, dtype=np.int64))
    cat = {c: (np.concatenate(v) if v else np.zeros(0, dtype=object)) for c, v in parts.items()}
    return Table(cat, np.concatenate(files), np.concatenate(rows), desc.files)


def _read_file(desc: Description, path: Path, columns: list[str], file_format: str):
    import pyarrow as pa
    import pyarrow.dataset as ds

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
            raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} (dataset.toml names it); "
                            f"the file has {', '.join(dataset.schema.names)}")
        table = dataset.to_table(columns=columns)   # scanned in batches, only these columns
        if any(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in table.schema.types):
            raise pa.ArrowInvalid("a column holds bytes that are not UTF-8 text")
        return table
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        line = first_bad_utf8_line(path) if file_format in ("csv", "jsonl") else None
        if line:
            raise DataError(f"{path} line {line}: not UTF-8 text; save the file as UTF-8") from None
        raise DataError(f"{path}: cannot read it as {file_format} (as dataset.toml describes it): "
                        f"{str(exc).splitlines()[0]}") from None


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
        if not text[i]:
            raise DataError(f"{table.where(i)}: the label ({desc.column('label', 'label')}) is empty")
        raise DataError(f"{table.where(i)}: unknown label {text[i]!r}; the run's labels are {', '.join(names)}"
                        + (" (map values to names with [label_values] in dataset.toml)" if names else ""))
    return finish(desc, table, y, keep)


def finish(desc: Description, table: Table, y: np.ndarray, keep: np.ndarray | None = None) -> Labelled:
    """Duplicate ids, the train/test split and sensitive groups of labelled rows."""
    id_col = desc.column("id")
    if id_col:
        check_unique(table.columns[id_col], table, f"id column {id_col!r}")
    rows = np.arange(len(table)) if keep is None else np.flatnonzero(keep)
    split_col = desc.column("split")
    if split_col:
        values = np.char.lower(np.char.strip(cells(table.columns[split_col]).astype(str)))
        bad = np.flatnonzero(~np.isin(values, SPLITS))
        if len(bad):
            raise DataError(f"{table.where(bad[0])}: split column {split_col!r} is {values[bad[0]]!r}; "
                            "use train or test")
        train, test = rows[values[rows] == "train"], rows[values[rows] == "test"]
    else:
        train, test = seeded_split(y[rows], desc.test_fraction, desc.seed)
        train, test = rows[train], rows[test]
    for name, idx in (("train", train), ("test", test)):
        if len(idx) == 0:
            raise DataError(f"{desc.folder}: the {name} split is empty ({len(rows)} usable rows in "
                            f"{', '.join(table.names)}); give it rows or change [split]")
    groups = {attr: band.group(table.columns[band.column]) for attr, band in desc.sensitive.items()}
    return Labelled(table, y, train, test, groups, dropped=len(table) - len(rows))


def check_unique(values: np.ndarray, table: Table, what: str) -> None:
    import pandas as pd

    keys = pd.Series(cells(values))
    dup = np.flatnonzero(keys.duplicated().to_numpy())
    if len(dup):
        i = int(dup[0])
        first = int(np.flatnonzero((keys == keys[i]).to_numpy())[0])
        raise DataError(f"{table.where(i)}: duplicate {what} value {keys[i]!r} (also at {table.where(first)})")


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
