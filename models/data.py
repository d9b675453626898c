"""Data helpers shared by the tasks: bundled-data location, checksum verification,
seeded stratified splits and the seeded Dirichlet label-skew partition over sites."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedcare.errors import DataError

#: the repository's data/ folder (FEDCARE_DATA_DIR overrides it, e.g. for a packaged install)
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"


def bundled_dir(name: str) -> Path:
    root = Path(os.environ.get("FEDCARE_DATA_DIR", BUNDLED_DATA))
    return root / name


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: Path, checksums: Mapping[str, str]) -> None:
    """Raise DataError unless every file exists in ``folder`` with its expected md5."""
    for filename, expected in checksums.items():
        path = Path(folder) / filename
        if not path.is_file():
            raise DataError(
                f"data file {path} is missing; restore it from the repository's data/ folder "
                "(or set FEDCARE_DATA_DIR to a folder holding it)"
            )
        actual = md5_of(path)
        if actual != expected:
            raise DataError(
                f"data file {path} is corrupted (md5 {actual}, expected {expected}); "
                "restore the original copy from the repository's data/ folder"
            )


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train_idx, test_idx), each sorted."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def seeded_subset(indices: np.ndarray, max_n: int, seed: int) -> np.ndarray:
    """At most ``max_n`` of ``indices`` (0 = all), chosen with ``seed``; order kept."""
    indices = np.asarray(indices)
    if max_n <= 0 or len(indices) <= max_n:
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=max_n, replace=False))


def dirichlet_partition(
    train_labels: Sequence[int],
    test_labels: Sequence[int],
    n_sites: int,
    alpha: float,
    seed: int,
    min_train: int = 2,
    min_test: int = 2,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split train and test examples over ``n_sites`` with a Dirichlet(alpha) label skew.

    One proportion vector per class is drawn (the same for train and test, so a site's
    test mix follows its train mix). Sites left with fewer than ``min_train`` /
    ``min_test`` examples take them from the largest site, so every site has both.
    Returns per site (train_idx, test_idx), indices into the given label arrays."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if len(train_labels) < n_sites * min_train or len(test_labels) < n_sites * min_test:
        raise DataError(
            f"not enough examples for {n_sites} sites ({len(train_labels)} train, "
            f"{len(test_labels)} test); lower sites or raise data.max_*_per_site"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(np.concatenate([train_labels, test_labels]))
    props = {c: rng.dirichlet(np.full(n_sites, alpha)) for c in classes}
    parts = []
    for labels in (train_labels, test_labels):
        sites: list[list[int]] = [[] for _ in range(n_sites)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            idx = idx[rng.permutation(len(idx))]
            cuts = (np.cumsum(props[c])[:-1] * len(idx)).round().astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                sites[s].extend(chunk.tolist())
        parts.append(sites)
    for sites, minimum in zip(parts, (min_train, min_test)):
        _top_up(sites, minimum)
    return [(np.sort(np.array(tr, dtype=int)), np.sort(np.array(te, dtype=int))) for tr, te in zip(*parts)]


def site_label_mix(num_classes: int, alpha: float, seed: int, index: int) -> np.ndarray:
    """One virtual site's label proportions, Dirichlet(alpha), drawn from (seed, index)
    alone: any site of any number of sites, without partitioning the others (a large
    alpha, e.g. 1000, is IID in effect)."""
    return np.random.default_rng([seed, index, 0]).dirichlet(np.full(num_classes, alpha))


def _top_up(sites: list[list[int]], minimum: int) -> None:
    """Move examples from the largest site to any site below ``minimum`` (deterministic)."""
    for s, members in enumerate(sites):
        while len(members) < minimum:
            donor = max(range(len(sites)), key=lambda i: len(sites[i]))
            members.append(sites[donor].pop())
