"""Personalisation: which part of the trainable state a site keeps local.

``lora.personalize``: ``""`` shares everything; ``head`` keeps the non-LoRA trainable
tensors (the classification head) local and federates the adapter; ``lora_B`` keeps
every LoRA B local and federates the A factors and the head. The client keeps the
personal keys; the server aggregates (and screens) only the shared keys.
"""
from __future__ import annotations

from typing import Iterable

from fedcare.errors import ConfigError

from .lora import is_lora_b, is_lora_key

PERSONALIZE_MODES = ("", "head", "lora_B")


def split_personal(state: Iterable[str], mode: str) -> tuple[set[str], set[str]]:
    """(shared keys, personal keys) of a trainable state (a dict or its keys)."""
    keys = list(state)
    if mode not in PERSONALIZE_MODES:
        raise ConfigError(f"lora.personalize must be one of '', head, lora_B; got '{mode}'")
    if mode == "":
        personal: set[str] = set()
    elif mode == "head":
        if not any(is_lora_key(k) for k in keys):
            raise ConfigError("lora.personalize=head needs a LoRA task (a model whose "
                              "trainable state is all head would share nothing)")
        personal = {k for k in keys if not is_lora_key(k)}
    else:
        personal = {k for k in keys if is_lora_b(k)}
        if not personal:
            raise ConfigError("lora.personalize=lora_B needs LoRA B factors in the trainable state")
    shared = set(keys) - personal
    if not shared:
        raise ConfigError(f"lora.personalize={mode} leaves nothing to federate")
    return shared, personal
