"""``fedcare site check``: read a site's folder exactly as training would, check it against
the data contract, and summarise what the federation will use and what would leave.

Everything here runs at the site; the summary is for the site's own staff.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.fairness import suppressed_groups
from fedcare.models.families import Prepared, prepare
from fedcare.models.registry import get_task
from fedcare.models.sitedata import Contract, Feature, describe, parse_features

#: a preset's family and contract (its dataset.toml must describe that family)
PRESETS = ("heart-disease", "medical-abstracts", "breastmnist", "medical-llm")
FAMILY_OF = {"heart-disease": "tabular", "medical-abstracts": "text", "breastmnist": "image", "medical-llm": "text"}
#: tasks whose model is a language model with a LoRA adapter (no classifier head)
LANGUAGE_MODELS = ("medical-llm", "instruct")


def preset_contract(task: str) -> Contract | None:
    if task == "heart-disease":
        from fedcare.models.heart_disease import FEATURES, LABELS

        return Contract(LABELS, parse_features(FEATURES))
    if task in ("medical-abstracts", "medical-llm"):   # medical-llm asks each abstract as its question
        from fedcare.models.medical_abstracts import preset_contract as abstracts

        return abstracts()
    if task == "breastmnist":
        from fedcare.models.breastmnist import LABELS

        return Contract(labels=LABELS)
    return None


def check_folder(path: str, task: str | None, cfg: RunConfig, min_group_size: int,
                 mode: str | None = None) -> dict[str, Any]:
    """Validate the folder as training reads it (every image decoded) and return the
    summary (DataError naming file/row if bad). ``mode``: the run's train.mode (None: the
    task's own), which decides what leaves the site."""
    desc = describe(path)
    family = FAMILY_OF.get(task or "", task)
    if family and family != desc.family:
        raise ConfigError(f"--task {task} reads a {family} dataset but {desc.path} describes family = \"{desc.family}\"")
    preset = preset_contract(task or "")
    if preset is None:   # no run yet: the description's own labels/features stand in for the contract
        preset = Contract(labels=desc.labels, features=tuple(Feature(f) for f in desc.features))
    contract = Contract.from_config(cfg, preset)
    prepared = prepare(desc, contract, decode_all=True)
    mode = mode or get_task(task or desc.family).settings()["train.mode"]
    return summarise(prepared, min_group_size, mode, task or desc.family)


def summarise(p: Prepared, min_group_size: int, mode: str = "lora", task: str = "") -> dict[str, Any]:
    lab, desc, names = p.labelled, p.desc, p.contract.labels
    out: dict[str, Any] = {
        "folder": str(desc.folder), "dataset_id": desc.dataset_id, "family": desc.family, "format": desc.format,
        **({"layout": desc.layout} if desc.family == "image" else {}), "mode": mode,
        "files": list(desc.files) or sorted({n.split("/")[0] for n in lab.table.names}),
        "rows": {"train": int(len(lab.train)), "test": int(len(lab.test)), "dropped": int(lab.dropped)},
    }
    if desc.family != "instruct":
        counts = {sp: Counter(names[k] for k in lab.y[idx]) for sp, idx in (("train", lab.train), ("test", lab.test))}
        out["classes"] = {n: {sp: counts[sp].get(n, 0) for sp in counts} for n in names}
        out["labels_absent_here"] = [n for n in names if not any(counts[sp].get(n) for sp in counts)]
    facts = p.facts
    if "missing values" in facts:
        out["missing_values"] = facts["missing values"]
    if "sizes" in facts and len(facts["sizes"]):
        s = facts["sizes"]
        out["image_sizes"] = {"min": [int(s[:, 0].min()), int(s[:, 1].min())],
                              "max": [int(s[:, 0].max()), int(s[:, 1].max())],
                              "resized_to": p.contract.image_size, "colour": desc.colour}
    if "value range" in facts:
        out["value_range"] = {u: {"min": lo, "max": hi, "mapped_by": sorted(how)}
                              for u, (lo, hi, how) in facts["value range"].items()}
    if "texts" in facts:
        chars = np.fromiter((len(str(t)) for t in facts["texts"]), dtype=np.int64, count=len(facts["texts"]))
        out["text_lengths"] = {"chars_min": int(chars.min()), "chars_median": int(np.median(chars)),
                               "chars_max": int(chars.max()), "tokens_kept": p.contract.text_length}
    out["groups"] = {}
    for attr, values in lab.groups.items():   # suppressed as the run suppresses (complementary too)
        sizes = dict(sorted(Counter(values[lab.test].tolist()).items()))
        hidden = suppressed_groups(sizes, min_group_size)
        out["groups"][attr] = {g: {"test_rows": n, "suppressed": g in hidden} for g, n in sizes.items()}
    out["min_group_size"] = min_group_size
    out["leaves_the_site"] = leaves(p, min_group_size, mode, task)
    return out


#: what trains and leaves, per family and train.mode
MODEL_PARTS = {"lora": "the LoRA adapter and classifier head", "head": "the classifier head alone (the frozen "
               "encoder stays as shipped; no LoRA adapter)", "full": "all of the model's parameters"}


def leaves(p: Prepared, min_group_size: int, mode: str = "lora", task: str = "") -> str:
    if p.desc.family == "tabular":
        model = "the logistic-regression weights"
    elif p.desc.family == "instruct" or task in LANGUAGE_MODELS:
        model = "the LoRA adapter" if mode == "lora" else MODEL_PARTS[mode]
    else:
        model = MODEL_PARTS[mode]
    return (f"Per round: {model} after local training (under DP-SGD when the run asks for it), the number of "
            f"training examples ({len(p.labelled.train)}), the mean training loss and the epsilon spent; "
            f"test metrics over {len(p.labelled.test)} test rows and per-group prediction counts for groups of "
            f"at least {min_group_size} (smaller groups are suppressed, and with them the next smallest while "
            "the suppressed ones could be worked out from the rest). No record, text, image, feature value or "
            "anything fit on the data (standardisation, vocabulary, class weights) leaves the site.")


def render(summary: dict[str, Any]) -> str:
    s = summary
    layout = f", layout {s['layout']}" if "layout" in s else ""
    lines = [f"{s['folder']}: dataset {s['dataset_id']} ({s['family']}, {s['format']}{layout}: "
             f"{', '.join(s['files'][:10])}{' ...' if len(s['files']) > 10 else ''})",
             f"rows: train {s['rows']['train']}, test {s['rows']['test']}"
             + (f", {s['rows']['dropped']} left out (missing value)" if s['rows']['dropped'] else "")]
    if "classes" in s:
        lines.append("classes (train / test):")
        lines += [f"  {name}: {c['train']} / {c['test']}" for name, c in s["classes"].items()]
        if s["labels_absent_here"]:
            lines.append(f"  absent at this site (allowed): {', '.join(s['labels_absent_here'])}")
    if "missing_values" in s:
        lines.append("missing values: " + (", ".join(f"{k} {v}" for k, v in s["missing_values"].items() if v) or "none"))
    if "image_sizes" in s:
        i = s["image_sizes"]
        lines.append(f"images: {i['colour']}, {i['min'][0]}x{i['min'][1]} to {i['max'][0]}x{i['max'][1]} pixels, "
                     f"resized to {i['resized_to']}x{i['resized_to']}")
    lines += [f"values: {u} {v['min']:g}..{v['max']:g}, mapped to 0..1 by {'; '.join(v['mapped_by'])}"
              for u, v in s.get("value_range", {}).items()]
    if "text_lengths" in s:
        t = s["text_lengths"]
        what = "prompt" if s["family"] == "instruct" else "text"
        lines.append(f"{what} lengths: {t['chars_min']}..{t['chars_max']} characters (median {t['chars_median']}); "
                     f"the first {t['tokens_kept']} tokens are used")
    for attr, groups in s["groups"].items():
        cells = [f"{g} {c['test_rows']}" + (" (suppressed)" if c["suppressed"] else "") for g, c in groups.items()]
        lines.append(f"groups by {attr} (test rows): {', '.join(cells)}")
    if not s["groups"]:
        lines.append("sensitive attributes: none described (fairness is reported per class)")
    lines.append(f"what would leave the site: {s['leaves_the_site']}")
    return "\n".join(lines)
