"""Heart-disease-like virtual hospitals, any number of them (bench/scale.py, the
multi-node test): the model, loss and metrics of heart-disease, but ``cfg.sites``
virtual sites instead of the four real centres.

Each virtual site draws its rows from the four centres' complete rows pooled and
standardised together, with its own label mix from Dirichlet(``data.dirichlet_alpha``)
(a large alpha, e.g. 1000, is IID in effect) and a little noise on the continuous
features, so that no two sites hold the same records. A site's data is made from
(seed, site index) alone, when the worker that trains it first asks: nothing is
partitioned up front, whatever the number of sites. Synthetic: for scale and systems
work, not for clinical claims (use heart-disease for those)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError

from .base import SiteSplit
from .data import bundled_dir, site_label_mix, verify_files
from .heart_disease import CENTRES, HeartDiseaseTask, encode, read_centre_file, sensitive_groups

SITE_TRAIN, SITE_TEST = 32, 16     # rows per site unless data.max_*_per_site set them
CONTINUOUS = (0, 2, 3, 5, 7)       # age, trestbps, chol, thalach, oldpeak in encode()'s columns
NOISE = 0.1                        # standard deviations of noise on those columns


@lru_cache(maxsize=1)
def _pool() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(standardised features, labels, sensitive groups) of every centre's complete rows."""
    folder = bundled_dir("heart-disease")
    verify_files(folder, dict(CENTRES.values()))
    raw = np.concatenate([read_centre_file(folder / name) for name, _ in CENTRES.values()])
    x, y = encode(raw)
    x = (x - x.mean(axis=0)) / (x.std(axis=0, ddof=1) + 1e-9)
    return x, y, sensitive_groups(raw)


def site_index(site_id: str, n_sites: int) -> int:
    prefix, _, number = site_id.partition("-")
    if prefix != "site" or not number.isdigit() or int(number) >= n_sites:
        raise DataError(f"unknown heart-disease-virtual site '{site_id}'; sites are site-0 .. site-{n_sites - 1}")
    return int(number)


class HeartDiseaseVirtualTask(HeartDiseaseTask):
    name = "heart-disease-virtual"
    fixed_sites = None

    def site_ids(self, cfg: RunConfig) -> list[str]:
        return [f"site-{i}" for i in range(cfg.sites)]

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        if cfg.data.path:
            raise ConfigError("heart-disease-virtual makes its sites' data; a site's own folder is the "
                              "heart-disease or tabular task's (drop data.path)")
        index = site_index(site_id, cfg.sites)
        x, y, groups = _pool()
        mix = site_label_mix(2, cfg.data.dirichlet_alpha, cfg.seed, index)
        rng = np.random.default_rng([cfg.seed, index, 1])
        by_label = [np.flatnonzero(y == c) for c in (0, 1)]

        def rows(n: int) -> np.ndarray:
            labels = rng.choice(2, size=n, p=mix)
            return np.array([rng.choice(by_label[c]) for c in labels], dtype=int)

        def tensors(idx: np.ndarray) -> TensorDataset:
            feats = x[idx].copy()
            feats[:, CONTINUOUS] += rng.normal(0.0, NOISE, size=(len(idx), len(CONTINUOUS)))
            return TensorDataset(torch.tensor(feats, dtype=torch.float32), torch.tensor(y[idx], dtype=torch.float32))

        train = rows(cfg.data.max_train_per_site or SITE_TRAIN)
        test = rows(cfg.data.max_test_per_site or SITE_TEST)
        return SiteSplit(site_id=site_id, train=tensors(train), test=tensors(test),
                         groups={k: v[test] for k, v in groups.items()})
