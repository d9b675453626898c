"""Fed-Heart-Disease with the FLamby protocol: 4 real hospitals, 13 features,
per-centre 66/34 stratified split (seed 43), per-centre standardisation, logistic
regression trained with BCE (see data/PROVENANCE.md and FLamby's fed_heart_disease)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError

from .base import SiteSplit, Task
from .data import bundled_dir, verify_files
from .sitedata import PRESET_LABELS

COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num")
DROPPED = ("slope", "ca", "thal")
#: site id -> bundled file name and md5 (the checksums FLamby verifies)
CENTRES = {
    "cleveland": ("processed.cleveland.data", "2d91a8ff69cfd9616aa47b59d6f843db"),
    "hungary": ("processed.hungarian.data", "22e96bee155b5973568101c93b3705f6"),
    "switzerland": ("processed.switzerland.data", "9a87f7577310b3917730d06ba9349e20"),
    "va": ("processed.va.data", "4249d03ca7711e84f4444768c9426170"),
}
#: categorical levels, one-hot with the first level dropped (as FLamby's get_dummies)
CATEGORICAL = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2)}
ALLOWED = {"sex": (0, 1), "fbs": (0, 1), "exang": (0, 1), "num": (0, 1, 2, 3, 4), **CATEGORICAL}
TRAIN_FRACTION, SPLIT_SEED = 0.66, 43
NUM_FEATURES = 13
#: the preset's data contract, for a site that describes its own records in a dataset.toml
LABELS = PRESET_LABELS["heart-disease"]
FEATURES = "age,sex,trestbps,chol,fbs,thalach,exang,oldpeak,cp=1|2|3|4,restecg=0|1|2"
CANARY_NORM = 1000.0   # privacy-audit canaries lie this many standard deviations out


def read_centre_file(path: Path) -> np.ndarray:
    """Rows of a processed.*.data file with slope/ca/thal dropped and every row with a
    missing value removed: float array [N, 11] (10 features + num)."""
    keep = [i for i, c in enumerate(COLUMNS) if c not in DROPPED]
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read heart-disease data file {path}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(COLUMNS):
            raise DataError(f"{path}, line {lineno}: expected {len(COLUMNS)} comma-separated "
                            f"values ({', '.join(COLUMNS)}), got {len(cells)}")
        cells = [cells[i] for i in keep]
        if "?" in cells:
            continue
        try:
            values = [float(c) for c in cells]
        except ValueError:
            raise DataError(f"{path}, line {lineno}: non-numeric value in {line!r} "
                            "(use numbers, or '?' for a missing value)") from None
        row = dict(zip([c for c in COLUMNS if c not in DROPPED], values))
        for col, allowed in ALLOWED.items():
            if row[col] not in allowed:
                raise DataError(f"{path}, line {lineno}: {col}={row[col]:g} is not one of {allowed}")
        rows.append(values)
    if not rows:
        raise DataError(f"{path}: no complete rows (every row has a missing value or the file is empty)")
    return np.asarray(rows, dtype=np.float64)


def encode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 13], binary labels [N]) from cleaned rows: numeric columns in file
    order, then the one-hot columns of cp and restecg (first level dropped)."""
    names = [c for c in COLUMNS if c not in DROPPED]
    col = {c: raw[:, i] for i, c in enumerate(names)}
    numeric = [col[c] for c in names[:-1] if c not in CATEGORICAL]
    dummies = [(col[c] == level).astype(np.float64) for c, levels in CATEGORICAL.items() for level in levels[1:]]
    x = np.stack(numeric + dummies, axis=1)
    y = (col["num"] > 0).astype(np.float64)
    return x, y


def split_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre split: 66/34, seed 43, stratified when each class has > 2 rows."""
    from sklearn.model_selection import train_test_split

    levels, counts = np.unique(y, return_counts=True)
    stratify = y if len(levels) > 1 and (counts > 2).all() else None
    train, test = train_test_split(np.arange(len(y)), test_size=1.0 - TRAIN_FRACTION,
                                   train_size=TRAIN_FRACTION, random_state=SPLIT_SEED, stratify=stratify)
    return np.sort(train), np.sort(test)


def sensitive_groups(raw: np.ndarray) -> dict[str, np.ndarray]:
    age, sex = raw[:, COLUMNS.index("age")], raw[:, COLUMNS.index("sex")]
    age_band = np.where(age < 50, "<50", np.where(age < 60, "50-59", "60+"))
    return {"sex": np.where(sex == 1, "male", "female"), "age_band": age_band}


@lru_cache(maxsize=16)
def _centre_split(path: str) -> SiteSplit:
    raw = read_centre_file(Path(path))
    x, y = encode(raw)
    train, test = split_indices(y)
    if len(train) < 2:
        raise DataError(f"{path}: only {len(raw)} complete rows; a site needs at least 4")
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0, ddof=1)  # torch's default (unbiased), as FLamby
    x = (x - mean) / (std + 1e-9)

    def tensors(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x[idx], dtype=torch.float32), torch.tensor(y[idx], dtype=torch.float32))

    return SiteSplit(site_id="", train=tensors(train), test=tensors(test), groups=sensitive_groups(raw[test]),
                     train_groups=sensitive_groups(raw[train]))


def site_file(folder: Path) -> Path:
    """The one processed-format ``*.data`` file in a site's own data folder."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    files = sorted(folder.glob("*.data")) if folder.is_dir() else []
    if len(files) != 1:
        raise DataError(f"data.path {folder} must be a folder holding exactly one *.data file in the "
                        f"UCI processed format ({', '.join(COLUMNS)}); found {len(files)}")
    return files[0]


class HeartDiseaseTask(Task):
    name = "heart-disease"
    sensitive_attributes = ("sex", "age_band")
    num_classes = 2
    fixed_sites = len(CENTRES)
    uses_lora = False
    audit_canaries = NUM_FEATURES
    defaults = {"train.local_steps": 100, "train.batch_size": 4, "train.lr": 1e-3, "train.optimizer": "adam"}
    # Server learning rate and adaptivity of the adaptive rules (bench/heart_sweep.py: 16
    # (eta, tau) settings over seeds 42-46; with tau 1e-3 both stayed under FedAvg), and
    # q-FedAvg's local SGD (its update divides the round's change by the client learning
    # rate, which assumes SGD; SGD lr 0.01). bench/heart_disease.py reports them.
    strategy_defaults = {"fedadam": {"strategy.eta": 0.3, "strategy.tau": 0.1},
                         "fedyogi": {"strategy.eta": 1.0, "strategy.tau": 1.0},
                         "qfedavg": {"train.optimizer": "sgd", "train.lr": 0.01}}

    def site_ids(self, cfg: RunConfig) -> list[str]:
        return list(CENTRES)

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        from .sitedata import Contract, has_description, parse_features

        if has_description(cfg.data.path):
            from .families import load_own

            return load_own(cfg, "tabular", site_id, Contract(LABELS, parse_features(FEATURES)))
        if cfg.data.path:
            path = site_file(Path(cfg.data.path))
        else:
            if site_id not in CENTRES:
                raise DataError(f"unknown heart-disease site '{site_id}'; sites are {', '.join(CENTRES)}")
            folder = bundled_dir("heart-disease")
            verify_files(folder, dict(CENTRES.values()))
            path = folder / CENTRES[site_id][0]
        split = _centre_split(str(path.resolve()))
        return SiteSplit(site_id=site_id, train=split.train, test=split.test, groups=split.groups,
                         train_groups=split.train_groups)

    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return torch.nn.Linear(NUM_FEATURES, 1).train()

    def batch_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y.float())

    def predict(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        p = torch.sigmoid(model(x).squeeze(-1)).detach().cpu().double().numpy()
        return np.stack([1.0 - p, p], axis=1), y.detach().cpu().numpy().astype(int)

    def canaries(self, m: int, rng: np.random.Generator, train: TensorDataset) -> TensorDataset:
        """Audit canaries a 14-parameter model can memorise: each lies CANARY_NORM
        standard deviations out along its own feature axis (so it pulls one weight only,
        hence at most NUM_FEATURES of them), labelled against the site's own data on that
        axis, so that only training on it can make the model fit it."""
        if m > NUM_FEATURES:
            raise ConfigError(f"heart-disease's logistic regression can hold at most {NUM_FEATURES} audit canaries "
                              f"(one per feature), asked for {m}")
        x, y = train.tensors if isinstance(train, TensorDataset) else map(torch.stack, zip(*train))
        trend = torch.sign(((2 * y.double() - 1)[:, None] * x.double()).mean(0)).numpy()
        axes, sign = rng.permutation(NUM_FEATURES)[:m], rng.choice([-1.0, 1.0], m)
        feats = np.zeros((m, NUM_FEATURES))
        feats[np.arange(m), axes] = CANARY_NORM * sign
        labels = (sign * trend[axes] < 0).astype(np.float64)
        return TensorDataset(torch.tensor(feats, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32))
