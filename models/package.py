"""An exported model folder (``fedcare export``): what it holds and how it loads.

Every folder has ``fedcare.json`` (the machine-readable card: task, the run's whole
config, how to rebuild) and ``fedcare_state.safetensors`` (the trainable state with the
names the store uses; for a small model that is its whole ``state_dict``). A LoRA task
also has a standard peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
for ``PeftModel.from_pretrained``. ``load_model`` rebuilds the model the way the run
built it (``Task.build_model`` with the run's config) and loads the state, so it works
for whatever model class a task builds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcare.config import RunConfig
from fedcare.errors import FedcareError, ModelError

from .base import Task

FORMAT = "fedcare-model/1"
CARD_JSON = "fedcare.json"
STATE_FILE = "fedcare_state.safetensors"


@dataclass
class ExportedModel:
    folder: Path
    meta: dict            # fedcare.json
    cfg: RunConfig        # the run's config (data.path empty: set a site's own folder)
    task: Task
    model: torch.nn.Module


def read_meta(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / CARD_JSON
    if not path.is_file():
        raise ModelError(f"{folder} is not a fedcare model folder (no {CARD_JSON}); "
                         "make one with `fedcare export RUN_ID --out DIR`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not readable JSON: {' '.join(str(err).split())}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r} "
                         f"is not {FORMAT!r}")
    return meta


def save_state(state: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


def load_model(folder: Path, device: torch.device | str = "cpu") -> ExportedModel:
    """Rebuild the exported model in eval mode; ModelError if the folder is not a
    fedcare export, or its weights do not fit the task it names, or were altered."""
    from safetensors.numpy import load_file

    from .registry import get_task
    from .state import set_trainable_state, state_sha256, trainable_names

    folder = Path(folder)
    meta = read_meta(folder)
    cfg = RunConfig.from_dict(meta["rebuild"]["config"])
    cfg.data.path = ""
    task = get_task(meta["rebuild"]["task"])
    try:
        state = load_file(str(folder / STATE_FILE))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelError(f"cannot read {folder / STATE_FILE}: {' '.join(str(err).split())}") from None
    if state_sha256(state) != meta["hashes"]["state_sha256"]:
        raise ModelError(f"{folder / STATE_FILE} does not match the content hash in {CARD_JSON} "
                         "(the weights were altered or come from another export)")
    try:
        model = task.build_model(cfg)
    except FedcareError as err:
        raise ModelError(f"{folder}: cannot rebuild the model of task {task.name} from {CARD_JSON}: {err}") from None
    expected = set(trainable_names(model))
    if set(state) != expected:
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ModelError(f"{folder}: the weights do not fit task {task.name} "
                         f"(missing {missing[:2]}, unknown {unknown[:2]}); is this a model of another task?")
    try:
        set_trainable_state(model, state)
    except RuntimeError as err:  # a tensor of another shape
        raise ModelError(f"{folder}: the weights do not fit task {task.name}'s model: "
                         f"{' '.join(str(err).split())[:200]}") from None
    return ExportedModel(folder=folder, meta=meta, cfg=cfg, task=task, model=model.to(device).eval())
