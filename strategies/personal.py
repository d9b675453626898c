"""Personalisation: which part of the trainable state a site keeps local.

``personalize.method=personal_head`` (FedPer): on a LoRA task the head (as
``lora.personalize=head``); on a model whose trainable state is all head (train.mode=head,
a small model) the output layer's bias, i.e. the site's own class prior, while the
weights are federated. The other methods (finetune, ditto) keep a whole personal model
at the site and federate everything (client/personalize.py).

``lora.personalize``: ``""`` shares everything; ``head`` keeps the non-LoRA trainable
tensors (the classification head) local and federates the adapter; ``lora_B`` keeps
every LoRA B local and federates the A factors and the head. The client keeps the
personal keys; the server aggregates (and screens) only the shared keys.
"""
from __future__ import annotations

from typing import Iterable

from fedcare.config import RunConfig
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


def personal_split(state: Iterable[str], cfg: RunConfig) -> tuple[set[str], set[str]]:
    """(shared keys, personal keys) of a trainable state under the run's settings: the
    one place the site (what it keeps) and the server (what it expects) both ask."""
    keys = list(state)
    if cfg.lora.personalize:
        return split_personal(keys, cfg.lora.personalize)
    if cfg.personalize.method != "personal_head":
        return set(keys), set()
    if any(is_lora_key(k) for k in keys):
        return split_personal(keys, "head")
    biases = [k for k in keys if k.endswith("bias")]
    if not biases:
        raise ConfigError("personalize.method=personal_head on a model without LoRA keeps its output "
                          "layer's bias local, but this model's trainable state has no bias")
    personal = {biases[-1]}
    shared = set(keys) - personal
    if not shared:
        raise ConfigError("personalize.method=personal_head leaves nothing to federate")
    return shared, personal
