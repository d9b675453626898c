"""``fedcare export``: a run's global model as a folder a hospital can use.

The numbers in the folder's ``fedcare.json`` and model card are cut from the run's
report (``server/report.py``, the same dict as ``fedcare report --json``), so they equal
the report's. The weights are the store's global state of the exported round, loaded
into the model the task builds (``Task.build_model`` with the run's config); a peft
model is written with ``save_pretrained`` (adapter + trained head), and every model's
trainable state also as ``fedcare_state.safetensors`` (``models/package.py`` loads it).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np

from fedcare.config import RunConfig
from fedcare.errors import ExportError
from fedcare.models.package import CARD_JSON, FORMAT, STATE_FILE, save_state
from fedcare.models.registry import get_task
from fedcare.models.state import set_trainable_state, state_sha256

from .report import benefit_summary, build_report, client_privacy_summary, final_metrics, privacy_summary
from .store import Store

EXPORT_EVENT = "exported"
CARD_FILE = "README.md"


def export_run(store: Store, run_id: str, out: Path, round: int | None = None) -> dict:
    """Write the export of ``run_id`` (its final round, or ``round``) into ``out``
    (created; must be empty) and record an "exported" event; returns fedcare.json."""
    report = build_report(store, run_id)   # StoreError for an unknown run
    rnd = exported_round(report, round)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new folder")
    state = store.load_global_state(run_id, rnd)
    meta = describe(report, rnd)
    out.mkdir(parents=True, exist_ok=True)
    meta["files"] = write_weights(RunConfig.from_dict(report["config"]), state, out)
    meta["hashes"]["state_sha256"] = state_sha256(state)
    meta["hashes"]["files"] = {name: _file_sha256(out / name) for name in meta["files"]}
    from .model_card import render_card

    (out / CARD_JSON).write_text(json.dumps(meta, indent=2))
    (out / CARD_FILE).write_text(render_card(meta))
    store.add_event(run_id, EXPORT_EVENT, f"round {rnd} exported to {out.resolve()}",
                    data={"round": rnd, "out": str(out.resolve()), "state_sha256": meta["hashes"]["state_sha256"]})
    return meta


def preview(store: Store, run_id: str, round: int | None = None) -> tuple[dict, str]:
    """(fedcare.json, model card) as an export of that round would write them, without
    writing anything (no file list or file hashes yet)."""
    from .model_card import render_card

    report = build_report(store, run_id)
    meta = describe(report, exported_round(report, round))
    meta["files"] = [STATE_FILE] + (["adapter_config.json", "adapter_model.safetensors"]
                                    if meta["task"]["uses_lora"] else [])
    return meta, render_card(meta)


def zip_folder(folder: Path) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(Path(folder).iterdir()):
            z.write(p, p.name)
    return buf.getvalue()


def exported_round(report: dict, round: int | None) -> int:
    """The round to export: ``round`` if committed with a global state, else (run
    completed) its last such round; ExportError otherwise."""
    with_state = [r["round"] for r in report["rounds"] if r["state_sha256"]]
    if round is not None:
        if round not in with_state:
            raise ExportError(f"run {report['run_id']} has no committed round {round} with a global state "
                              f"(committed: {_ranges(with_state) or 'none'})")
        return round
    if report["status"] != "completed":
        raise ExportError(f"run {report['run_id']} is {report['status']}, not completed; export a committed "
                          f"round with --round N (committed: {_ranges(with_state) or 'none'})")
    if not with_state:
        raise ExportError(f"run {report['run_id']} has no stored global state to export")
    return max(with_state)


def describe(report: dict, rnd: int) -> dict:
    """fedcare.json without the file list and hashes of the written files."""
    cfg = report["config"]
    task = get_task(report["task"])
    rounds = [r for r in report["rounds"] if r["round"] <= rnd]
    this = rounds[-1]
    site_rows = [dict(x, round=r["round"]) for r in rounds for x in r["sites"]]
    evals = [dict(e, round=rnd) for e in this["evaluations"]]
    lora = cfg.get("lora", {})
    mode = (cfg.get("train") or {}).get("mode", "lora")   # head / full runs carry no LoRA adapter
    uses_lora = task.uses_lora and mode == "lora"
    return {
        "format": FORMAT, "run_id": report["run_id"], "round": rnd, "exported_at": time.time(),
        "status": report["status"], "code_version": report["code_version"],
        "task": {"name": task.name, "num_classes": task.num_classes, "primary_metric": task.primary_metric,
                 "sensitive_attributes": list(task.sensitive_attributes), "uses_lora": uses_lora,
                 "train_mode": mode},
        "data_contract": {"task": task.name, "loader": f"{type(task).__module__}.{type(task).__name__}.load_site",
                          "site_folder": "data.path = the site's folder, in the task's site format",
                          "description": (inspect.getdoc(task.load_site) or "").split("\n\n")[0],
                          "format": _module_doc(task)},
        "rebuild": {"task": task.name, "base_model": getattr(task, "base_model", None), "config": cfg,
                    "loader": "fedcare.models.package.load_model"},
        "sites": _sites(site_rows, this["evaluations"]),
        "rounds": {"planned": report["rounds_planned"], "committed": report["rounds_done"], "exported": rnd},
        "strategy": {"name": report["strategy"], **cfg.get("strategy", {})},
        "lora": ({"mode": lora.get("aggregation"), "r": lora.get("r"), "alpha": lora.get("alpha"),
                  "target_modules": lora.get("target_modules"), "personalize": lora.get("personalize") or None}
                 if uses_lora else None),
        "privacy": {"level": (cfg.get("dp") or {}).get("level", "none"), "dp": report["dp"],
                    "per_site": privacy_summary(site_rows),
                    "client": client_privacy_summary(rounds, cfg)},
        "fairness": this["fairness"],
        "metrics": final_metrics(evals),
        "benefit": benefit_summary(evals),   # per site: alone, global and personalised ({} if not measured)
        "baselines": None,   # pooled / site-alone: not part of a run (bench/ measures them)
        "hashes": {"config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
                   "store_state_sha256": this["state_sha256"]},
    }


def write_weights(cfg: RunConfig, state: dict[str, np.ndarray], out: Path) -> list[str]:
    """The state as ``fedcare_state.safetensors``; a peft model also as a peft adapter
    folder (``save_pretrained`` of the task's model with the state loaded)."""
    save_state(state, out / STATE_FILE)
    files = [STATE_FILE]
    model = get_task(cfg.task).build_model(cfg)
    try:
        set_trainable_state(model, state)
    except (KeyError, RuntimeError) as err:   # names or shapes of another model
        raise ExportError(f"the stored global state does not fit task {cfg.task}'s model: "
                          f"{' '.join(str(err).split())[:200]}") from None
    if hasattr(model, "peft_config"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model.save_pretrained(str(out))
        files += sorted(p.name for p in out.iterdir() if p.name.startswith("adapter_"))
    return files


def _sites(site_rows: list[dict], evaluations: list[dict]) -> list[dict]:
    tests = {e["scope"]: e["num_examples"] for e in evaluations if e["kind"] == "federated" and e["scope"] != "global"}
    out: dict[str, dict] = {}
    for x in site_rows:
        s = out.setdefault(x["site"], {"site": x["site"], "train_examples": None, "test_examples": tests.get(x["site"]),
                                       "rounds_accepted": 0, "rounds_not_accepted": 0})
        if x["accepted"]:
            s["rounds_accepted"] += 1
            s["train_examples"] = x["num_examples"]
        else:
            s["rounds_not_accepted"] += 1
    for site, n in tests.items():
        out.setdefault(site, {"site": site, "train_examples": None, "test_examples": n,
                              "rounds_accepted": 0, "rounds_not_accepted": 0})
    return [out[s] for s in sorted(out)]


def _module_doc(task) -> str:
    import sys

    return " ".join((sys.modules[type(task).__module__].__doc__ or "").split())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ranges(rounds: list[int]) -> str:
    return f"{min(rounds)}-{max(rounds)}" if rounds else ""
