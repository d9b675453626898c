"""The model card (``README.md`` in the Hugging Face model-card layout: a YAML metadata
header, then markdown) rendered from an export's ``fedcare.json``. Every number here
comes from that dict; the YAML header carries them unrounded, the tables to 4 places."""
from __future__ import annotations

import yaml

PIPELINE = {"medical-abstracts": "text-classification", "medical-llm": "text-generation",
            "breastmnist": "image-classification", "heart-disease": "tabular-classification"}


def card_header(meta: dict) -> dict:
    task, glob = meta["task"], meta["metrics"]["metrics"]
    header = {
        "library_name": "peft" if "adapter_config.json" in meta.get("files", []) else "pytorch",
        "base_model": meta["rebuild"]["base_model"],
        "pipeline_tag": PIPELINE.get(task["name"], "other"),
        "tags": ["fedcare", "federated-learning", task["name"]]
                + (["lora"] if task["uses_lora"] else []) + ([] if meta["privacy"]["level"] == "none"
                                                             else ["differential-privacy"]),
        "metrics": sorted(glob),
        "model-index": [{
            "name": f"{meta['run_id']} round {meta['round']}",
            "results": [{
                "task": {"type": PIPELINE.get(task["name"], "other")},
                "dataset": {"name": f"{task['name']} (federated test splits of {len(meta['sites'])} sites)",
                            "type": task["name"], "split": "test"},
                "metrics": [{"type": k, "value": v, "name": f"{k} (global)"}
                            for k, v in sorted(glob.items()) if v is not None],
            }],
        }],
        "fedcare": {"run_id": meta["run_id"], "round": meta["round"], "format": meta["format"]},
    }
    if header["base_model"] is None:
        del header["base_model"]
    return header


def render_card(meta: dict) -> str:
    header = yaml.safe_dump(card_header(meta), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{header}---\n", _intro(meta), _use(meta), _training(meta), _privacy(meta),
             _evaluation(meta), _benefit(meta), _fairness(meta), _provenance(meta)]
    return "\n".join(p for p in parts if p)


def _intro(meta: dict) -> str:
    t = meta["task"]
    return (f"# {t['name']}: federated model of run `{meta['run_id']}` (round {meta['round']})\n\n"
            f"Trained with fedcare across {len(meta['sites'])} sites; no patient record left a site. "
            f"Task: {t['num_classes']} classes, primary metric {t['primary_metric']}. "
            f"Run status at export: {meta['status']}.\n\n"
            f"**Data contract.** {meta['data_contract']['format']}\n")


#: how a text model of fedcare is rebuilt with transformers + peft alone (tests/test_export.py runs it)
PEFT_LOADER = ['import torch',
               'from peft import PeftModel',
               'from transformers import AutoModel',
               '',
               'class MeanPoolClassifier(torch.nn.Module):  # encoder, masked mean of its token states, linear head',
               '    def __init__(self, encoder, num_labels):',
               '        super().__init__()',
               '        self.encoder = encoder',
               '        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)',
               '',
               '    def forward(self, input_ids, attention_mask):',
               '        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state',
               '        m = attention_mask.unsqueeze(-1).to(h.dtype)',
               '        return self.classifier((h * m).sum(1) / m.sum(1).clamp(min=1.0))  # logits',
               '']


def _use(meta: dict) -> str:
    base = meta["rebuild"]["base_model"]
    lines = ["## How to use", "",
             "Check it on your own held-out patients first (nothing leaves your machine):", "",
             "```", "fedcare site evaluate --model THIS_FOLDER --data YOUR_SITE_FOLDER", 
             "fedcare predict --model THIS_FOLDER --data YOUR_SITE_FOLDER --out predictions.csv", "```", "",
             "In Python, for any task: `fedcare.models.package.load_model(THIS_FOLDER).model`."]
    if "adapter_config.json" in meta.get("files", []):
        lines += ["", f"With peft alone (base model `{base}`, the trained head is in `modules_to_save`):", "",
                  "```python", *PEFT_LOADER,
                  f"base = MeanPoolClassifier(AutoModel.from_pretrained(BASE_PATH), {meta['task']['num_classes']})",
                  "model = PeftModel.from_pretrained(base, THIS_FOLDER).eval()", "```"]
    else:
        lines += ["", "`fedcare_state.safetensors` is the model's whole state dict "
                  "(`safetensors.torch.load_file`, then `load_state_dict` on the task's model)."]
    if (meta.get("lora") or {}).get("personalize"):
        lines += ["", f"Note: the run kept `{meta['lora']['personalize']}` local at each site; "
                      "that part of this export is the shared initial value, not a trained one."]
    return "\n".join(lines) + "\n"


def _training(meta: dict) -> str:
    r, s, lora = meta["rounds"], meta["strategy"], meta["lora"]
    rows = [[x["site"], x["train_examples"], x["test_examples"], x["rounds_accepted"], x["rounds_not_accepted"]]
            for x in meta["sites"]]
    text = (f"## Training\n\nStrategy `{s['name']}`; {r['exported']} of {r['planned']} planned rounds "
            f"({r['committed']} committed)")
    mode = meta["task"].get("train_mode", "lora")
    if lora:
        text += f"; LoRA mode `{lora['mode']}`, r={lora['r']}, alpha={lora['alpha']}, targets `{lora['target_modules']}`.\n\n"
    elif mode == "head":
        text += ("; training mode `head`: the pretrained encoder stayed frozen and only the classification head "
                 "trained and left the sites (no LoRA adapter).\n\n")
    elif mode == "full":
        text += "; training mode `full`: every parameter trained.\n\n"
    else:
        text += ".\n\n"
    return text + _table(["site", "train examples", "test examples", "rounds accepted", "rounds not accepted"], rows)


def _privacy(meta: dict) -> str:
    p = meta["privacy"]
    text = f"## Privacy\n\nDP level: `{p['level']}` ({p['dp']}).\n\n"
    if p["per_site"]:
        rows = [[site, v.get("run_epsilon"), v.get("epsilon"), v.get("delta"), v.get("budget") or "none", v.get("accountant"),
                 v.get("noise_multiplier"), v.get("steps")] for site, v in sorted(p["per_site"].items())]
        text += _table(["site", "epsilon (this run)", "epsilon (lifetime)", "delta", "budget", "accountant",
                        "noise multiplier", "DP-SGD steps"], rows)
    if p["client"]:
        c = p["client"]
        text += (f"\nClient-level DP: epsilon {_fmt(c['epsilon'])} at delta {_fmt(c['delta'])} ({c['accountant']}), "
                 f"noise {_fmt(c['noise_multiplier'])}, clipping {_fmt(c['clipping_norm'])}, {c['releases']} releases.\n")
    if not p["per_site"] and not p["client"]:
        text += ("No differential privacy in this run: the model may memorise training records.\n"
                 if p["level"] == "none" else "No site reported a privacy spend (no update was trained under DP).\n")
    return text


def _evaluation(meta: dict) -> str:
    m = meta["metrics"]
    names = sorted(m["metrics"])
    rows = [["global (example-weighted)", *(m["metrics"].get(k) for k in names)]]
    rows += [[site, *(v.get(k) for k in names)] for site, v in sorted(m["per_site"].items())]
    text = f"## Evaluation (round {m['round']}, each site's test split)\n\n" + _table(["scope", *names], rows)
    if not meta.get("benefit"):
        text += "\nSite-alone baselines were not part of this run (`--baselines alone` adds them; see `bench/`).\n"
    return text


def _benefit(meta: dict) -> str:
    """Per site, on its own test split: alone, this global model and the site's
    personalised model (which stayed at the site), with the site's bootstrap intervals."""
    b = meta.get("benefit") or {}
    if not b:
        return ""
    models = [m for m in ("alone", "global", "personal") if any(m in e for e in b["sites"].values())]
    rows = []
    for site, e in b["sites"].items():
        prevalence = " ".join(f"{k}: {_fmt(v)}" for k, v in e["prevalence"].items()) or "suppressed"
        for metric in e.get("global", {}):
            cells = [e.get(m, {}).get(metric) for m in models]
            rows.append([site, e["n"], prevalence, metric,
                         *("-" if c is None else f"{_fmt(c['value'])} [{_fmt(c['lo'])}, {_fmt(c['hi'])}]"
                           for c in cells)])
    return (f"## Benefit of joining (round {b['round']}, each site's own test split)\n\n"
            "What each hospital gets: the model it trained on its data alone (equal compute), this global "
            "model, and its personalised model, which never left the site (only its metrics did). "
            f"Intervals: {b['level']:.0%} bootstrap over the site's test patients. Compare balanced accuracy, "
            "macro-F1 or AUROC across sites whose class prevalence differs: a model that predicts a site's "
            "majority class scores that prevalence in accuracy.\n\n"
            + _table(["site", "n", "prevalence", "metric", *models], rows))


def _fairness(meta: dict) -> str:
    f = meta["fairness"] or {}
    if not f:
        return "## Fairness\n\nNo fairness counts were stored for this round.\n"
    text = "## Fairness\n\nPer group (counts summed over sites; `suppressed` = fewer than the site's minimum group size):\n\n"
    for attr, v in sorted(f.items()):
        if attr in ("by_site", "excluded_sites") or not isinstance(v, dict):
            continue
        rows = [[g, "suppressed" if c.get("suppressed") else c.get("n"), c.get("accuracy"), c.get("tpr"),
                 c.get("fpr"), c.get("auroc"), c.get("ece"), ", ".join(c.get("suppressed_at") or []) or "-"]
                for g, c in sorted(v.get("by_group", {}).items())]
        text += (f"**{attr}**: demographic parity difference {_fmt(v.get('demographic_parity_difference'))}, "
                 f"equalized odds difference {_fmt(v.get('equalized_odds_difference'))}, worst group "
                 f"{v.get('worst_group')} ({_fmt(v.get('worst_group_accuracy'))})\n\n")
        text += _table(["group", "n", "accuracy", "tpr", "fpr", "auroc", "ece", "suppressed at"], rows) + "\n"
    by_site = f.get("by_site") or {}
    if by_site.get("sites"):
        rows = [[s, c.get("n"), c.get("accuracy"), c.get("auroc"), c.get("ece")] for s, c in sorted(by_site["sites"].items())]
        text += (f"Per site: gap {_fmt(by_site.get('gap'))} between {by_site.get('best_site')} and "
                 f"{by_site.get('worst_site')}\n\n" + _table(["site", "n", "accuracy", "auroc", "ece"], rows))
    for site, why in sorted((f.get("excluded_sites") or {}).items()):
        text += f"\nExcluded from the fairness sums: {site} ({why})\n"
    return text


def _provenance(meta: dict) -> str:
    h = meta["hashes"]
    rows = [[name, digest] for name, digest in sorted(h.get("files", {}).items())]
    return ("## Provenance\n\n"
            f"fedcare {meta['code_version']}; run config sha256 `{h['config_sha256']}`; global state sha256 "
            f"`{h.get('state_sha256')}` (the store's: `{h['store_state_sha256']}`).\n\n"
            + _table(["file", "sha256"], rows))


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e3 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"
    return str(v)
