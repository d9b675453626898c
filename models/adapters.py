"""Attaching a peft LoRA adapter the same way for every LoRA task."""
from __future__ import annotations

import warnings

import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError


def lora_targets(cfg: RunConfig) -> list[str]:
    return [m.strip() for m in cfg.lora.target_modules.split(",") if m.strip()]


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA: A stays at its (shared, seeded) initial value; only B and the head train."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)


def attach_lora(model: torch.nn.Module, cfg: RunConfig, modules_to_save: list[str],
                allowed: type | tuple[type, ...] = (torch.nn.Linear,), task_type=None, hint: str = ""):
    """Wrap ``model`` with LoRA on ``cfg.lora.target_modules`` (which must name modules of
    the ``allowed`` types); ``modules_to_save`` train fully (the head). Seed the RNG before
    calling so that every site and the server get the same initial adapter."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(cfg)
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, allowed)}
    unknown = [t for t in targets if t not in present]
    if unknown or not targets:
        raise ConfigError(f"lora.target_modules {unknown or targets} not found in the model; {hint}")
    peft_cfg = LoraConfig(task_type=task_type, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=targets, modules_to_save=modules_to_save)
    with warnings.catch_warnings():  # peft on transformers 5: is_gradient_checkpointing rename
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, peft_cfg)
    if cfg.lora.aggregation == "ffa":
        freeze_lora_a(model)
    return model.train()


def with_training_mode(model: torch.nn.Module, cfg: RunConfig, modules_to_save: list[str], **lora_kw):
    """``train.mode``: ``lora`` attaches the adapter (the ``modules_to_save`` head trains
    too); ``head`` freezes everything but the head (the model's ``freeze_encoder`` hook, if
    any, may then cache embeddings); ``full`` trains every parameter."""
    if cfg.train.mode == "lora":
        return attach_lora(model, cfg, modules_to_save=modules_to_save, **lora_kw)
    if cfg.train.mode == "head":
        if hasattr(model, "freeze_encoder"):
            model.freeze_encoder()
        for name, p in model.named_parameters():
            p.requires_grad_(any(part in modules_to_save for part in name.split(".")[:-1]))
    return model.train()
