"""Launching a run: resolve and validate the configuration, register the run in the
store, submit the Flower app, and follow its rounds in the store until it ends.

Shared by ``fedcare simulate`` (own simulation SuperLink) and ``fedcare server run`` /
``resume`` (a deployed SuperLink)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .config import RunConfig
from .errors import ConfigError

console = Console(stderr=True)


def resolve_config(task: str, sets: list[str], **explicit) -> RunConfig:
    """RunConfig's defaults < the task's settings for the chosen training mode, with or
    without DP-SGD, and for the chosen strategy < explicit options < --set, then validated."""
    from .models.registry import get_task
    from .strategies.registry import check_strategy_config

    cfg = RunConfig(task=task)
    t = get_task(task)
    cfg.update({k: v for k, v in explicit.items() if v is not None})
    cfg.apply_sets(sets)
    chosen = {k for k, v in explicit.items() if v is not None} | {s.partition("=")[0].strip() for s in sets}
    dp_sgd = cfg.dp.level == "sample" or (cfg.dp.level == "none" and (cfg.dp.epsilon > 0 or cfg.dp.noise_multiplier > 0))
    tuned = {**t.settings(cfg.train.mode if "train.mode" in chosen else None, dp_sgd),
             **t.strategy_defaults.get(cfg.strategy.name, {})}
    cfg.update({k: v for k, v in tuned.items() if k not in chosen})
    if t.fixed_sites is not None:
        if explicit.get("sites") not in (None, t.fixed_sites):
            raise ConfigError(f"task {task} has {t.fixed_sites} natural sites; drop --sites or set it to {t.fixed_sites}")
        cfg.sites = t.fixed_sites
    if cfg.strategy.min_sites > cfg.sites:
        cfg.strategy.min_sites = cfg.sites
    cfg.validate()
    check_strategy_config(cfg, t)  # a bad combination fails here, before anything starts
    return cfg


def site_sets(items: list[str]) -> list[str]:
    """``fedcare simulate --site NAME=FOLDER ...``: the ``--set`` that gives each virtual site
    its own described folder (absolute, so every Ray worker finds it)."""
    from .errors import DataError
    from .models.sitedata import DESCRIPTION, has_description, site_paths

    own = site_paths(",".join(items))
    for name, folder in own.items():
        path = Path(folder).expanduser().resolve()
        if not has_description(path):
            raise DataError(f"--site {name}={folder}: no {DESCRIPTION} in that folder (docs/data.md)")
        if "," in str(path) or "=" in str(path):
            raise ConfigError(f"--site {name}={folder}: a folder whose path holds ',' or '=' cannot be named here")
        own[name] = str(path)
    return [f"data.site_paths={','.join(f'{k}={v}' for k, v in own.items())}"] if own else []


def register_run(cfg: RunConfig, db: str):
    """Open the store (fails before anything starts if it cannot) and create the run."""
    from .server.store import Store

    store = Store(db)
    run_id = store.create_run(cfg.task, cfg.strategy.name, cfg.to_dict(), __version__)
    store.add_event(run_id, "created", f"{cfg.task} / {cfg.strategy.name} / {cfg.rounds} rounds / {cfg.sites} sites")
    cfg.runtime.run_id, cfg.runtime.db = run_id, db
    return store, run_id


def default_ledger_dir(run_id: str) -> str:
    return tempfile.mkdtemp(prefix=f"fedcare-ledgers-{run_id}-")


def follow(store, run_id: str, cfg: RunConfig, proc, log_path: Path, quiet: bool = False,
           poll: float = 1.0, on_tick: Callable[[], None] | None = None) -> str:
    """Show per-round progress from the store while ``proc`` (flwr run) lives; return
    the run's final status ("completed", "failed"...)."""
    last = store.last_round(run_id)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=quiet) as bar:
        job = bar.add_task(run_id, total=cfg.rounds, completed=last, info="starting Flower...")
        while True:
            done = store.last_round(run_id)
            if done != last:
                last = done
                bar.update(job, completed=done, info=_round_info(store, run_id))
            status = store.get_run(run_id)["status"]
            if proc.poll() is not None or status in ("completed", "failed"):
                break
            if on_tick:
                on_tick()
            time.sleep(poll)
        # let the ServerApp's last write land
        for _ in range(20):
            status = store.get_run(run_id)["status"]
            if status in ("completed", "failed") or proc.poll() is not None:
                break
            time.sleep(0.5)
        bar.update(job, completed=store.last_round(run_id), info=_round_info(store, run_id))
    status = store.get_run(run_id)["status"]
    if status not in ("completed", "failed"):
        code = proc.poll()
        msg = f"Flower run ended (exit {code}) before the run completed; log: {log_path}"
        store.set_status(run_id, "failed", msg)
        store.add_event(run_id, "failed", msg)
        status = "failed"
    return status


def _round_info(store, run_id: str) -> str:
    """The latest round's global test accuracy, for the progress line."""
    last = store.last_round(run_id)
    if not last:
        return ""
    for e in store.evaluations(run_id, round=last):
        if e["scope"] == "global" and e.get("kind", "federated") == "federated":
            acc = e["metrics"].get("accuracy")
            return f"accuracy {acc:.3f}" if isinstance(acc, (int, float)) else ""
    return ""
