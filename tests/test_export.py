"""fedcare export / site evaluate / predict on real stored runs.

The runs go through the real ServerApp loop and ClientApp handlers (InProcessGrid: the
same Flower messages, no SuperLink start-up): Fed-Heart-Disease under DP-SGD, and a
tiny medical-abstracts LoRA run on the real MiniLM weights. The exported adapter is
then loaded by plain peft + transformers in a fresh Python process.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedcare.cli import main
from fedcare.config import RunConfig
from fedcare.launch import resolve_config
from fedcare.models.data import bundled_dir
from fedcare.models.registry import get_task
from fedcare.server.store import Store

from sitefolders import heart_parquet


def _run(task: str, url: str, overrides: list[str], **kw) -> str:
    from fedcare.server.federation import run_federation
    from fedcare.server.local_grid import InProcessGrid

    cfg = resolve_config(task, overrides, **kw)
    cfg.runtime.db = url
    return run_federation(InProcessGrid(cfg, cfg.sites), cfg)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`fedcare ARGS` through the real entry point (main), in this process."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["fedcare", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def heart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heart")
    url = f"sqlite:///{folder / 'store.db'}"
    run_id = _run("heart-disease", url, ["train.local_steps=5", "dp.epsilon=3",
                                         f"site.ledger_dir={folder / 'ledgers'}"], rounds=2)
    return url, run_id, folder


@pytest.fixture(scope="module")
def heart_export(heart):
    url, run_id, folder = heart
    out = folder / "model"
    with Store(url) as store:
        from fedcare.server.export import export_run

        export_run(store, run_id, out)
    return out


def _report(capsys, url: str, run_id: str) -> dict:
    code, out, _ = cli(capsys, "report", run_id, "--db", url, "--json")
    assert code == 0
    return json.loads(out)


def _card_header(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_numbers_equal_the_report(heart, heart_export, capsys):
    url, run_id, _ = heart
    report = _report(capsys, url, run_id)
    meta = json.loads((heart_export / "fedcare.json").read_text())
    assert meta["round"] == report["final"]["round"] == 2
    assert meta["metrics"] == report["final"]
    assert meta["privacy"]["per_site"] == report["privacy"] and len(report["privacy"]) == 4
    assert all(p["run_epsilon"] > 0 and p["delta"] > 0 for p in meta["privacy"]["per_site"].values())
    assert meta["fairness"] == report["fairness"] and "sex" in meta["fairness"]
    assert meta["hashes"]["state_sha256"] == report["rounds"][-1]["state_sha256"]
    assert [s["site"] for s in meta["sites"]] == sorted(report["final"]["per_site"])
    assert meta["rebuild"]["config"] == report["config"]
    header = _card_header(heart_export)
    card_metrics = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert card_metrics == {k: v for k, v in report["final"]["metrics"].items() if v is not None}
    body = (heart_export / "README.md").read_text()
    for site, p in report["privacy"].items():   # the privacy table shows each site's epsilons
        assert f"| {site} | {p['run_epsilon']:.4f} | {p['epsilon']:.4f} |" in body
    # the export is recorded with the run (the dashboard marks that round)
    assert any(e["kind"] == "exported" and e["data"]["round"] == 2 for e in report["events"])


def test_site_evaluate_on_own_folder_equals_the_store(heart, heart_export, tmp_path, capsys):
    """A hospital's own folder (here Cleveland's file, copied out of the repository):
    evaluating the export there gives exactly what the federation stored for it."""
    url, run_id, _ = heart
    site = tmp_path / "cleveland"
    site.mkdir()
    shutil.copy(bundled_dir("heart-disease") / "processed.cleveland.data", site)
    code, out, err = cli(capsys, "site", "evaluate", "--model", str(heart_export), "--data", str(site), "--json")
    assert code == 0, err
    result = json.loads(out)
    stored = _report(capsys, url, run_id)["final"]["per_site"]["cleveland"]
    assert result["metrics"] == stored
    assert result["examples"] == 104
    cal = result["calibration"]
    assert sum(b["count"] for b in cal["bins"]) == 104 and 0 <= cal["ece"] <= 1
    assert set(result["groups"]) == {"sex", "age_band"}
    assert sum(g["n"] for g in result["groups"]["sex"].values()) == 104


def test_site_evaluate_names_a_described_folder_by_its_dataset_id(heart_export, tmp_path, capsys):
    """A described folder of VA records is its own site, not the task's first ("cleveland")."""
    site = heart_parquet(tmp_path / "va", "processed.va.data", dataset_id="va-records-2024")
    code, out, err = cli(capsys, "site", "evaluate", "--model", str(heart_export), "--data", str(site), "--json")
    assert code == 0, err
    assert json.loads(out)["site"] == "va-records-2024" and "cleveland" not in out
    code, text, err = cli(capsys, "site", "evaluate", "--model", str(heart_export), "--data", str(site))
    assert code == 0 and "va-records-2024" in text and "cleveland" not in text, text


def test_predict_writes_every_row(heart_export, tmp_path, capsys):
    site = tmp_path / "va"
    site.mkdir()
    shutil.copy(bundled_dir("heart-disease") / "processed.va.data", site)
    for name in ("p.csv", "p.parquet"):
        code, _, err = cli(capsys, "predict", "--model", str(heart_export), "--data", str(site),
                           "--out", str(tmp_path / name))
        assert code == 0, err
    import pandas as pd

    csv, parquet = pd.read_csv(tmp_path / "p.csv"), pd.read_parquet(tmp_path / "p.parquet")
    assert list(csv.columns) == ["row_id", "label", "predicted_class", "prob_0", "prob_1"]
    split = get_task("heart-disease").load_site("va", RunConfig(task="heart-disease"))
    assert len(csv) == len(parquet) == len(split.train) + len(split.test)
    np.testing.assert_allclose(csv[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-9)
    assert (csv["predicted_class"] == csv[["prob_0", "prob_1"]].to_numpy().argmax(axis=1)).all()
    assert (csv["row_id"] == parquet["row_id"]).all()


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2(heart, heart_export, tmp_path, capsys):
    url, run_id, folder = heart
    _one_line_error(*cli(capsys, "export", "run-nope", "--out", str(tmp_path / "a"), "--db", url)[::2], "run-nope")
    _one_line_error(*cli(capsys, "export", run_id, "--out", str(heart_export), "--db", url)[::2], "not an empty folder")
    _one_line_error(*cli(capsys, "export", run_id, "--round", "7", "--out", str(tmp_path / "b"), "--db", url)[::2],
                    "no committed round 7")
    # a run still running: refused, unless --round names a committed round
    running = f"sqlite:///{tmp_path / 'running.db'}"
    shutil.copy(folder / "store.db", tmp_path / "running.db")
    with Store(running) as store:
        store.set_status(run_id, "running")
    _one_line_error(*cli(capsys, "export", run_id, "--out", str(tmp_path / "c"), "--db", running)[::2], "running")
    code, _, err = cli(capsys, "export", run_id, "--round", "1", "--out", str(tmp_path / "c"), "--db", running)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "fedcare.json").read_text())["round"] == 1
    # data that violates the task's format, a folder that is not an export, weights of another task
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.data").write_text("63,1,1,145\n")
    _one_line_error(*cli(capsys, "site", "evaluate", "--model", str(heart_export), "--data", str(bad))[::2],
                    "expected 14 comma-separated values")
    _one_line_error(*cli(capsys, "site", "evaluate", "--model", str(bad), "--data", str(bad))[::2],
                    "not a fedcare model folder")
    other = tmp_path / "other-task"
    shutil.copytree(heart_export, other)
    meta = json.loads((other / "fedcare.json").read_text())
    meta["rebuild"]["task"] = "breastmnist"
    meta["rebuild"]["config"]["task"] = "breastmnist"
    (other / "fedcare.json").write_text(json.dumps(meta))
    _one_line_error(*cli(capsys, "predict", "--model", str(other), "--data", str(bad), "--out", str(tmp_path / "p.csv"))[::2],
                    "task breastmnist")
    # a model of one task, a folder in another task's format
    _one_line_error(*cli(capsys, "site", "evaluate", "--model", str(heart_export),
                         "--data", str(bundled_dir("medical-abstracts")))[::2], "exactly one *.data file")
    _one_line_error(*cli(capsys, "predict", "--model", str(heart_export), "--data", str(bad),
                         "--out", str(tmp_path / "p.xlsx"))[::2], ".csv or .parquet")


PEFT_ONLY = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from peft import PeftModel
    from transformers import AutoModel

    class MeanPoolClassifier(torch.nn.Module):   # as the model card shows it
        def __init__(self, encoder, num_labels):
            super().__init__()
            self.encoder = encoder
            self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.classifier((h * m).sum(1) / m.sum(1).clamp(min=1.0))

    folder, base, inputs, out = sys.argv[1:]
    num_labels = json.load(open(f"{folder}/fedcare.json"))["task"]["num_classes"]
    model = MeanPoolClassifier(AutoModel.from_pretrained(base, local_files_only=True), num_labels)
    model = PeftModel.from_pretrained(model, folder).eval()
    data = np.load(inputs)
    probs = []
    with torch.no_grad():
        for i in range(0, len(data["ids"]), 64):
            ids, mask = torch.as_tensor(data["ids"][i:i + 64]), torch.as_tensor(data["mask"][i:i + 64])
            probs.append(torch.softmax(model(input_ids=ids, attention_mask=mask).float(), -1).numpy())
    np.save(out, np.concatenate(probs))
    print(sorted(sys.modules.keys() & {"fedcare"}))
""")


@pytest.mark.e2e
def test_lora_export_reloads_with_peft_alone(tmp_path, capsys):
    """A tiny medical-abstracts LoRA run; its export, loaded by peft + transformers in a
    fresh process (no fedcare import), reproduces the store's per-site metrics exactly."""
    from fedcare.models.medical_abstracts import model_dir
    from fedcare.models.metrics import classification_metrics

    url = f"sqlite:///{tmp_path / 'store.db'}"
    overrides = ["train.mode=lora", "train.local_steps=2", "data.max_train_per_site=16", "data.max_test_per_site=12",
                 "train.batch_size=8"]
    run_id = _run("medical-abstracts", url, overrides, rounds=1, sites=2)
    out = tmp_path / "model"
    code, _, err = cli(capsys, "export", run_id, "--out", str(out), "--db", url)
    assert code == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "fedcare.json"} <= {p.name for p in out.iterdir()}
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"]
    report = _report(capsys, url, run_id)
    cfg = RunConfig.from_dict(report["config"])
    task = get_task("medical-abstracts")
    for site, stored in report["final"]["per_site"].items():
        ids, mask, labels = task.load_site(site, cfg).test.tensors
        np.savez(tmp_path / f"{site}.npz", ids=ids.numpy(), mask=mask.numpy())
        proc = subprocess.run([sys.executable, "-c", PEFT_ONLY, str(out), str(model_dir()),
                               str(tmp_path / f"{site}.npz"), str(tmp_path / f"{site}.npy")],
                              capture_output=True, text=True, env={**_env(), "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "[]"   # fedcare was never imported there
        probs = np.load(tmp_path / f"{site}.npy")
        assert classification_metrics(probs, labels.numpy()) == stored
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    # the hospital's side: site-1's abstracts as its own described folder (a CSV whose split
    # column marks the run's train and test rows), evaluated through fedcare's loader: the
    # store's numbers again
    import pandas as pd

    from fedcare.models.medical_abstracts import load_corpus, site_rows

    folder, train_rows, test_rows = site_rows(task.site_ids(cfg), "site-1", cfg)
    corpus = load_corpus(folder)
    own = tmp_path / "site-1-own"
    own.mkdir()
    rows = [*train_rows, *test_rows]
    pd.DataFrame({"text": [corpus.texts[i] for i in rows], "split": ["train"] * len(train_rows) + ["test"] * len(test_rows),
                  "label": [corpus.class_names[corpus.labels[i]] for i in rows]}).to_csv(own / "notes.csv", index=False)
    (own / "dataset.toml").write_text('dataset_id = "site-1/notes"\nfamily = "text"\nformat = "csv"\n'
                                      'files = ["notes.csv"]\n[columns]\nsplit = "split"\n')
    code, text, err = cli(capsys, "site", "evaluate", "--model", str(out), "--data", str(own), "--json")
    assert code == 0, err
    assert json.loads(text)["metrics"] == report["final"]["per_site"]["site-1"]


def _env() -> dict:
    import os

    return dict(os.environ)
