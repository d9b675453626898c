"""Who this site is and what it keeps between messages.

A site is resolved from Flower's node config: in deployment the SuperNode is started
with ``site-id``, ``data-path``, ``ledger``, ``policy``, ``audit`` (and optionally
``lora-rank``, ``dataset-id``); in simulation Flower gives ``partition-id`` and the
virtual site is the task's site list at that index, with its ledger in
``site.ledger_dir``. The base model, the data split and the ledger are loaded once per
process and reused across rounds and runs (keyed by what determines them).
"""
from __future__ import annotations

import functools
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.base import SiteSplit, Task
from fedcare.models.registry import get_task
from fedcare.models.sitedata import site_paths
from fedcare.models.training import pick_device


@dataclass
class Site:
    site_id: str
    cfg: RunConfig
    task: Task
    node_config: dict[str, Any]

    # ------------------------------------------------------------ resolution
    @classmethod
    def from_context(cls, context: Context) -> "Site":
        cfg = RunConfig.from_flat(context.run_config, strict=False)
        nc = dict(context.node_config)
        if "site-id" in nc:
            # Deployed: where the site reads and writes is the site's own start-up,
            # never the coordinator's run config.
            cfg.data.path = str(nc.get("data-path") or "")
            cfg.site.ledger_dir = ""
        elif nc.get("data-path"):
            cfg.data.path = str(nc["data-path"])
        own = site_paths(cfg.data.site_paths) if "site-id" not in nc else {}
        cfg.data.site_paths = ""
        cfg.validate()
        task = get_task(cfg.task)
        if "site-id" in nc:
            site_id = str(nc["site-id"])
        elif own and "partition-id" in nc:    # a simulation of described folders: one per virtual site
            names = list(own)
            pid = int(nc["partition-id"])
            if pid >= len(names):
                raise ConfigError(f"partition {pid} has no site: the simulation names {len(names)} (--site)")
            site_id, cfg.data.path = names[pid], own[names[pid]]
        elif "partition-id" in nc:
            ids = task.site_ids(cfg)
            pid = int(nc["partition-id"])
            if pid >= len(ids):
                raise ConfigError(f"partition {pid} has no site: task {task.name} has {len(ids)} sites")
            site_id = ids[pid]
        else:
            raise ConfigError("node config needs 'site-id' (deployment) or 'partition-id' (simulation)")
        return cls(site_id=site_id, cfg=cfg, task=task, node_config=nc)

    @property
    def simulated(self) -> bool:
        """A virtual site of a simulation (Flower's ``partition-id``, no ``site-id``)."""
        return "site-id" not in self.node_config and "partition-id" in self.node_config

    # ------------------------------------------------------------- paths
    @property
    def ledger_path(self) -> Path | None:
        if self.node_config.get("ledger"):
            return Path(str(self.node_config["ledger"]))
        if self.cfg.site.ledger_dir:
            from .ledger import ledger_path_for

            return Path(ledger_path_for(self.cfg.site.ledger_dir, self.site_id))
        return None

    @property
    def audit_path(self) -> Path | None:
        if self.node_config.get("audit"):
            return Path(str(self.node_config["audit"]))
        ledger = self.ledger_path
        return ledger.with_name(f"{self.site_id}.audit.jsonl") if ledger else None

    @property
    def policy_path(self) -> str | None:
        return str(self.node_config["policy"]) if self.node_config.get("policy") else None

    @property
    def dataset_id(self) -> str:
        """The account the privacy ledger charges: the same records, the same account,
        whatever the run. Bundled data: task + site; a site's own data: the dataset_id of
        its dataset.toml (so moving or renaming the folder keeps the account), else its path."""
        from fedcare.models.sitedata import describe, has_description

        if self.node_config.get("dataset-id"):
            return str(self.node_config["dataset-id"])
        if has_description(self.cfg.data.path):
            return describe(self.cfg.data.path).dataset_id
        if self.cfg.data.path:
            return f"{self.task.name}/{Path(self.cfg.data.path).resolve()}"
        return f"{self.task.name}/{self.site_id}"

    @property
    def lora_rank(self) -> int | None:
        """The LoRA rank this site can afford: node config ``lora-rank`` (deployment)
        or ``lora.site_ranks`` by partition (simulation); None = the run's lora.r."""
        if self.node_config.get("lora-rank"):
            return int(self.node_config["lora-rank"])
        ranks = self.cfg.lora_site_ranks
        if ranks and "partition-id" in self.node_config:
            return ranks[int(self.node_config["partition-id"]) % len(ranks)]
        return None

    # ------------------------------------------------------------- cached parts
    def split(self) -> SiteSplit:
        return _split(self.task.name, self.site_id, _data_key(self.cfg))

    def model(self) -> torch.nn.Module:
        # A personalised site keeps a part of the model that no message overwrites: its
        # model is its own, never shared with another virtual site in this process.
        owner = self.site_id if self.cfg.lora.personalize or self.cfg.personalize.method == "personal_head" else ""
        return _model(self.task.name, _model_key(self.cfg, self.lora_rank), owner)

    @property
    def device(self) -> torch.device:
        """CUDA when this process sees a GPU: in simulation, only when Ray assigned the
        site a share of one (Ray hides the GPUs from a worker given none)."""
        return pick_device()

    @property
    def worker(self) -> str:
        """Where a virtual site runs, for the coordinator's record: "host/Ray node id/device"
        ("" when deployed: where a hospital computes is its own business)."""
        if not self.simulated:
            return ""
        ray = sys.modules.get("ray")   # loaded in a Ray worker; never imported for this
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
        return f"{socket.gethostname()}/{node}/{self.device.type}"


#: the run's data contract (config keys): part of what determines the model
CONTRACT_KEYS = ("labels", "features", "image_size", "text_length", "prompt_template")


def _data_key(cfg: RunConfig) -> str:
    return json.dumps({"data": cfg.to_dict()["data"], "sites": cfg.sites, "seed": cfg.seed}, sort_keys=True)


def _model_key(cfg: RunConfig, rank: int | None) -> str:
    d = cfg.to_dict()
    contract = {k: d["data"][k] for k in CONTRACT_KEYS}   # label count, feature width... shape the model
    return json.dumps({"lora": d["lora"], "seed": cfg.seed, "rank": rank, "dp": cfg.dp_enabled, "data": contract,
                       "mode": cfg.train.mode}, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _split(task_name: str, site_id: str, data_key: str) -> SiteSplit:
    cfg = RunConfig.from_dict(json.loads(data_key) | {"task": task_name})
    return get_task(task_name).load_site(site_id, cfg)


@functools.lru_cache(maxsize=2)
def _model(task_name: str, model_key: str, owner: str = "") -> torch.nn.Module:
    key = json.loads(model_key)
    cfg = RunConfig.from_dict({"task": task_name, "lora": key["lora"], "seed": key["seed"], "data": key["data"],
                               "train": {"mode": key["mode"]}})
    if key["rank"]:
        cfg.lora.r = key["rank"]
    model = get_task(task_name).build_model(cfg)
    # Device first, adapter already attached by the task: Opacus must see the
    # parameters where they will train (opacus#820).
    return model.to(pick_device()).train()
