"""Task registry: name -> Task class. A new task adds one line here."""
from __future__ import annotations

import importlib

from fedcare.errors import ConfigError

from .base import Task

_TASKS = {
    "heart-disease": "fedcare.models.heart_disease:HeartDiseaseTask",
    "heart-disease-virtual": "fedcare.models.heart_virtual:HeartDiseaseVirtualTask",
    "medical-abstracts": "fedcare.models.medical_abstracts:MedicalAbstractsTask",
    "breastmnist": "fedcare.models.breastmnist:BreastMnistTask",
    "medical-llm": "fedcare.models.medical_llm:MedicalLlmTask",
    # task families: a site's own data described by its dataset.toml (models/families.py)
    "tabular": "fedcare.models.families:TabularTask",
    "text": "fedcare.models.families:TextTask",
    "image": "fedcare.models.families:ImageTask",
    "instruct": "fedcare.models.instruct:InstructTask",
}


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ConfigError(f"unknown task '{name}'; choose one of: {', '.join(task_names())}")
    module, _, cls = _TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
