"""Task families: a kind of model and data, read from a site's own folder.

``tabular`` (CSV/Parquet: features + label, logistic regression), ``text`` (CSV/JSONL/
Parquet: text + label, MiniLM + LoRA as ``medical-abstracts``), ``image`` (PNG/JPEG class
folders or DICOM + a table, EfficientNet-Lite0 + LoRA or a head alone as ``breastmnist``) and
``instruct`` (JSONL prompt/response or chat messages, SmolLM2 + LoRA as ``medical-llm``).
The text, image and instruct families reuse their preset's model, loss and prediction:
only the data and the label count (the run's data contract) differ. Every family needs
``data.path`` (a folder with ``dataset.toml``); the bundled datasets stay presets by name.

``prepare(...)`` is the one loader: training and ``fedcare site check`` both call it, so
what the check reports is what trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import DataError, SiteProblem

from .base import SiteSplit, Task
from .breastmnist import BreastMnistTask
from .medical_abstracts import MedicalAbstractsTask
from .sitedata import (Contract, Description, Labelled, Table, cells, check_unique, columns_for, describe,
                       is_missing, label_rows, read_table)


@dataclass
class Prepared:
    """A site's data read and checked against the contract: the split that trains, and
    the facts ``fedcare site check`` prints (all computed at the site)."""

    desc: Description
    contract: Contract
    labelled: Labelled
    split: SiteSplit
    facts: dict = field(default_factory=dict)   # family-specific: missing values, sizes, lengths


def load_own(cfg: RunConfig, family: str, site_id: str, preset: Contract | None = None) -> SiteSplit:
    """A site's own folder (``data.path`` with ``dataset.toml``) read as ``family`` under the
    run's contract (``preset``: a bundled dataset's contract, which the run may override)."""
    return prepare_own(cfg, family, site_id, preset).split


def prepare_own(cfg: RunConfig, family: str, site_id: str, preset: Contract | None = None) -> Prepared:
    """``load_own`` with everything the family read (the contract, labelled rows, facts)."""
    return prepare(_own_folder(cfg, family), Contract.from_config(cfg, preset), site_id)


def _own_folder(cfg: RunConfig, family: str) -> Description:
    if not cfg.data.path:
        raise DataError(f"the {family} family reads a site's own folder: set data.path (fedcare site start --data)")
    desc = describe(cfg.data.path)
    if desc.family != family:
        raise DataError(f"{desc.path}: family = \"{desc.family}\" but this run trains the {family} family")
    return desc


def _split(site_id: str, lab: Labelled, train: Dataset, test: Dataset) -> SiteSplit:
    return SiteSplit(site_id=site_id, train=train, test=test,
                     groups={a: g[lab.test] for a, g in lab.groups.items()},
                     train_groups={a: g[lab.train] for a, g in lab.groups.items()})


# ----------------------------------------------------------------------------- tabular
def prepare_tabular(desc: Description, contract: Contract, site_id: str = "") -> Prepared:
    contract.need_labels("tabular")
    if not contract.features:
        raise DataError("a tabular run needs data.features (the feature columns in order; the data contract)",
                        problem=SiteProblem("contract", key="data.features"))
    local = {f.name: desc.features.get(f.name, f.name) for f in contract.features}
    table = read_table(desc, list(dict.fromkeys(list(local.values()) + columns_for(desc, "label"))))
    blocks, missing = [], {}
    for f in contract.features:
        col = table.columns[local[f.name]]
        gone = is_missing(col)
        missing[local[f.name]] = int(gone.sum())
        blocks.append(_encode_feature(f, local[f.name], col, gone, table, desc.feature_values.get(f.name)))
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(table), 0))
    keep = ~np.isnan(x).any(axis=1)
    lab = label_rows(desc, contract, table, keep)
    mean = x[lab.train].mean(axis=0)   # fit on this site's training rows only; never sent
    std = x[lab.train].std(axis=0, ddof=1) if len(lab.train) > 1 else np.ones(x.shape[1])
    x = (x - mean) / (np.nan_to_num(std) + 1e-9)
    binary = len(contract.labels) == 2
    yt = torch.tensor(lab.y, dtype=torch.float32 if binary else torch.long)

    def tensors(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x[idx], dtype=torch.float32), yt[torch.as_tensor(idx)])

    split = _split(site_id, lab, tensors(lab.train), tensors(lab.test))
    return Prepared(desc, contract, lab, split, {"missing values": missing, "rows dropped (missing value)": lab.dropped})


def _encode_feature(f, column: str, values: np.ndarray, gone: np.ndarray, table: Table,
                    codes: dict[str, str] | None = None) -> np.ndarray:
    """[N, width] floats (NaN where the value is missing) of one contract feature; ``codes``:
    this site's values mapped to the contract's levels ([features] in dataset.toml)."""
    if codes:
        distinct, inverse = np.unique(cells(values).astype(str), return_inverse=True)
        values = np.asarray([codes.get(v, v) for v in distinct], dtype=object)[inverse]
    if not f.levels:
        try:
            return np.where(gone, np.nan, values).astype(np.float64)[:, None]
        except (TypeError, ValueError):
            for i, v in enumerate(values):
                try:
                    float(v) if not gone[i] else None
                except (TypeError, ValueError):
                    raise DataError(f"{table.where(i)}: column {column!r} is {str(v)!r}, not a number "
                                    f"(feature {f.name} is numeric in the run's data contract)",
                                    problem=table.problem(i, "bad-value", column)) from None
            raise
    text = cells(values).astype(str)
    bad = np.flatnonzero(~gone & ~np.isin(text, f.levels))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{table.where(i)}: column {column!r} is {str(text[i])!r}; feature {f.name} takes "
                        f"{' | '.join(f.levels)} in the run's data contract (map this site's codes to them "
                        f"with [features] {f.name} = {{ column = \"{column}\", values = {{ ... }} }} in dataset.toml)",
                        problem=table.problem(i, "bad-value", column))
    out = np.stack([(text == level).astype(np.float64) for level in f.levels[1:]], axis=1)
    out[gone] = np.nan
    return out


class TabularTask(Task):
    """Logistic regression on standardised features (as heart-disease): one logit for
    two labels, softmax over more."""

    name = "tabular"
    num_classes = 2
    uses_lora = False
    defaults = {"train.local_steps": 100, "train.batch_size": 4, "train.lr": 1e-3, "train.optimizer": "adam"}

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        return load_own(cfg, "tabular", site_id)

    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        contract = Contract.from_config(cfg)
        self.num_classes = len(contract.need_labels("tabular"))
        width = sum(f.width for f in contract.features)
        torch.manual_seed(cfg.seed)
        return torch.nn.Linear(width, 1 if self.num_classes == 2 else self.num_classes).train()

    def batch_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        if model.out_features == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y.float())
        return torch.nn.functional.cross_entropy(model(x), y.long())

    def predict(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        if model.out_features == 1:
            p = torch.sigmoid(model(x).squeeze(-1)).detach().cpu().double().numpy()
            return np.stack([1.0 - p, p], axis=1), y.detach().cpu().numpy().astype(int)
        return torch.softmax(model(x).double(), -1).detach().cpu().numpy(), y.cpu().numpy().astype(int)


# ----------------------------------------------------------------------------- text
class TextRows(Dataset):
    """Texts tokenised when asked for: (input_ids, attention_mask, label)."""

    def __init__(self, texts: np.ndarray, labels: np.ndarray, length: int) -> None:
        self.texts, self.labels, self.length = texts, torch.as_tensor(labels, dtype=torch.long), length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        from .medical_abstracts import tokenizer

        enc = tokenizer()(str(self.texts[i]), truncation=True, max_length=self.length, padding="max_length",
                          return_tensors="pt")
        return enc["input_ids"][0], enc["attention_mask"][0], self.labels[i]


def read_texts(desc: Description, table: Table, role: str = "text") -> np.ndarray:
    col = desc.column(role, role)
    texts = table.columns[col]
    for i, t in enumerate(texts):
        if t is None or not str(t).strip():
            raise DataError(f"{table.where(i)}: the {role} ({col}) is empty",
                            problem=table.problem(i, "empty-value", col))
    return texts


def prepare_text(desc: Description, contract: Contract, site_id: str = "") -> Prepared:
    contract.need_labels("text")
    table = read_table(desc, columns_for(desc, "text", "label"))
    texts = read_texts(desc, table)
    lab = label_rows(desc, contract, table)
    n = contract.text_length
    split = _split(site_id, lab, TextRows(texts[lab.train], lab.y[lab.train], n),
                   TextRows(texts[lab.test], lab.y[lab.test], n))
    return Prepared(desc, contract, lab, split, {"texts": texts})


class TextTask(MedicalAbstractsTask):
    """Text classification: medical-abstracts' model with the contract's label count."""

    name = "text"
    defaults = {k: v for k, v in MedicalAbstractsTask.defaults.items() if k != "sites"}

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        return load_own(cfg, "text", site_id)

    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        self.num_classes = len(Contract.from_config(cfg).need_labels("text"))
        return super().build_model(cfg)


# ----------------------------------------------------------------------------- image
def prepare_image(desc: Description, contract: Contract, site_id: str = "", headers: bool = True,
                  decode_all: bool = False) -> Prepared:
    """``headers``: read every image's header (unreadable files and colour contradictions fail
    here); ``decode_all`` (``fedcare site check``): decode every image as training will, and
    report the range of values each format maps to [0, 1]."""
    from .images import ImageFiles, check_colour, decode, image_table, read_header

    contract.need_labels("image")
    table, paths = image_table(desc)
    lab = label_rows(desc, contract, table)
    check_unique(paths, table, "image file", desc.column("file"))
    root = desc.folder.resolve()
    names = np.asarray([str(Path(p).relative_to(root)) for p in paths], dtype=object)   # what may leave
    sizes, ranges = [], {}
    if headers or decode_all:
        for i, p in enumerate(paths):
            problem = SiteProblem("bad-dicom" if desc.format == "dicom" else "bad-image", names[i])
            where = table.where(i)
            h = read_header(p, desc.format, where, problem)
            check_colour(h, desc.colour, p, where, problem)
            sizes.append((h.width, h.height))
            if decode_all:
                d = decode(p, desc.format, desc.colour, desc.window, problem)
                low, high, how = ranges.get(d.units, (d.low, d.high, set()))
                ranges[d.units] = (min(low, d.low), max(high, d.high), how | {d.mapping})

    def files(idx: np.ndarray) -> ImageFiles:
        return ImageFiles(paths[idx], lab.y[idx], desc.format, desc.colour, contract.image_size, desc.window,
                          names[idx])

    split = _split(site_id, lab, files(lab.train), files(lab.test))
    facts = {"sizes": np.asarray(sizes).reshape(-1, 2)}
    if decode_all:
        facts["value range"] = ranges    # units -> (lowest, highest, how mapped to [0, 1])
    return Prepared(desc, contract, lab, split, facts)


class ImageTask(BreastMnistTask):
    """Image classification: breastmnist's model with the contract's label count, built
    by breastmnist's ``build_model``, so ``train.mode`` works the same (``head``: the frozen
    backbone's features cached per image, only the linear head trains and leaves the site)."""

    name = "image"
    defaults = {k: v for k, v in BreastMnistTask.defaults.items() if k != "sites"}

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        return load_own(cfg, "image", site_id)

    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        self.num_classes = len(Contract.from_config(cfg).need_labels("image"))
        return super().build_model(cfg)


PREPARE = {"tabular": prepare_tabular, "text": prepare_text, "image": prepare_image}


def prepare(desc: Description, contract: Contract, site_id: str = "", decode_all: bool = False) -> Prepared:
    """``decode_all``: also decode every image (``fedcare site check``), as training will."""
    if desc.family == "instruct":
        from .instruct import prepare_instruct

        return prepare_instruct(desc, contract, site_id)
    if desc.family == "image":
        return prepare_image(desc, contract, site_id, decode_all=decode_all)
    return PREPARE[desc.family](desc, contract, site_id)

