"""Personalisation at the site and the benefit of joining (issue 25): each personal model
trains and stays at the site, its DP-SGD steps are charged, the report carries the
per-site benefit, and intervals are what they claim to be."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcare import schemas as S
from fedcare.config import RunConfig
from fedcare.models.benefit import _weighted_metrics, bootstrap_metrics, wilson
from fedcare.models.metrics import classification_metrics
from fedcare.records import from_array_record, to_array_record
from fedcare.server.federation import initial_state

HEART = {"task": "heart-disease", "rounds": 2, "train.local_steps": 5, "personalize.steps": 7,
         "personalize.bootstrap": 50}


def _context(cfg: RunConfig, ledger_dir=None) -> Context:
    if ledger_dir is not None:
        cfg.site.ledger_dir = str(ledger_dir)
    return Context(run_id=1, node_id=1000, state=RecordDict(), run_config=cfg.to_flat(),
                   node_config={"partition-id": 1, "num-partitions": 4})


def _message(kind: str, state: dict, rnd: int) -> Message:
    return Message(RecordDict({S.ARRAYS: to_array_record(state), S.CONFIG: ConfigRecord({"server-round": rnd})}),
                   dst_node_id=1000, message_type=kind)


def _round_trip(cfg: RunConfig, context: Context):
    """Round 1's train reply and the last round's evaluate reply, at one site."""
    from fedcare.client import app as client_app
    from fedcare.strategies.personal import personal_split

    glob = initial_state(cfg)
    shared_keys, _ = personal_split(glob, cfg)
    shared = {k: v for k, v in glob.items() if k in shared_keys}
    trained = client_app.train(_message("train", shared, 1), context)
    assert trained.content[S.SITE][S.STATUS] == "ok", trained.content[S.SITE][S.REASON]
    evaluated = client_app.evaluate(_message("evaluate", shared, cfg.rounds), context)
    assert evaluated.content[S.SITE][S.STATUS] == "ok", evaluated.content[S.SITE][S.REASON]
    return glob, dict(from_array_record(trained.content[S.ARRAYS])), evaluated


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["finetune", "personal_head", "ditto"])
def test_each_personal_model_trains_and_only_its_metrics_leave(method, identity, tmp_path):
    cfg = RunConfig.from_flat({**HEART, "personalize.method": method, "personalize.alone": True}).validate()
    context = _context(cfg, tmp_path)
    glob, sent, evaluated = _round_trip(cfg, context)
    kept = {key: dict(from_array_record(context.state[key])) for key in ("personal", "ditto", "alone")
            if key in context.state}
    assert "alone" in kept
    if method == "personal_head":     # the output bias is the site's own; the weights travel
        assert set(sent) == {"weight"} and set(kept["personal"]) == {"bias"}
        # the global model is evaluated with the global bias (the initial one), not the site's
        from fedcare.client import app as client_app

        again = client_app.evaluate(_message("evaluate", sent, cfg.rounds), context)
        again = json.loads(again.content[S.SITE][S.BENEFIT_JSON])
        assert again["global"]["loss"] != again["personal"]["loss"]
    else:
        assert set(sent) == set(glob)
    if method == "ditto":
        assert set(kept["ditto"]) == set(glob)
    for part in kept.values():        # nothing the site keeps is what it sent
        for k, v in part.items():
            assert k not in sent or not np.allclose(v, sent[k])
    assert not evaluated.content.array_records            # an evaluation sends numbers only
    benefit = json.loads(evaluated.content[S.SITE][S.BENEFIT_JSON])
    assert set(benefit) == {"global", "personal", "alone"}
    for model, m in benefit.items():
        assert m["accuracy_lo"] <= m["accuracy"] <= m["accuracy_hi"]
        assert all(isinstance(v, float) for v in m.values())
    assert any(k.startswith("prevalence_") for k in benefit["global"])
    assert benefit["personal"] != benefit["global"] and benefit["alone"] != benefit["global"]
    local = json.loads(evaluated.content[S.SITE][S.LOCAL_METRICS_JSON])
    assert local["accuracy"] == benefit["personal"]["accuracy"]
    train_counts = json.loads(evaluated.content[S.SITE][S.FAIRNESS_JSON])["train"]   # the last round's
    assert set(train_counts["attributes"]) == {"sex", "age_band"}


def test_fairness_generalisation_gap_sums_train_counts_and_suppresses_small_groups():
    from fedcare.models.fairness import aggregate, site_counts

    rng = np.random.default_rng(0)

    def counts(n, correct_share, groups):
        labels = rng.integers(0, 2, n)
        right = rng.random(n) < correct_share
        pred = np.where(right, labels, 1 - labels)
        return site_counts(np.eye(2)[pred] * 0.8 + 0.1, labels, {"sex": np.array(groups)}, 5, "s")

    sites = {}
    for s in ("a", "b"):
        c = counts(40, 0.6, ["female"] * 20 + ["male"] * 20)
        c["train"] = counts(100, 0.9, ["female"] * 94 + ["male"] * 3 + ["other"] * 3)   # male: 3 in training
        sites[s] = c
    fairness = aggregate(sites)["sex"]["by_group"]
    female, male = fairness["female"], fairness["male"]
    assert female["train_n"] == 188
    expected = sum(sites[s]["train"]["attributes"]["sex"]["female"]["correct"] for s in sites) / 188
    assert female["train_accuracy"] == pytest.approx(expected)
    assert female["generalisation_gap"] == pytest.approx(expected - female["accuracy"])
    assert female["train_accuracy_lo"] < expected < female["train_accuracy_hi"]
    assert "train_accuracy" not in male and "generalisation_gap" not in male   # suppressed in training counts
    assert female["accuracy_lo"] < female["accuracy"] < female["accuracy_hi"]  # Wilson on every rate


@pytest.mark.timeout(300)
def test_personal_and_alone_steps_are_dp_sgd_steps_on_the_ledger_within_the_runs_epsilon(identity, tmp_path):
    from fedcare.client.ledger import SiteLedger, ledger_path_for
    from fedcare.client.site import Site

    cfg = RunConfig.from_flat({**HEART, "personalize.method": "finetune", "personalize.alone": True,
                               "dp.epsilon": 8.0, "dp.delta": 1e-4}).validate()
    assert cfg.site_dp_steps == 2 * 5 + 7 + 2 * 5      # federated, the final fine-tuning, alone
    context = _context(cfg, tmp_path)
    _round_trip(cfg, context)
    site = Site.from_context(context)
    ledger = SiteLedger(ledger_path_for(str(tmp_path), site.site_id))
    steps = sorted(s.steps for s in ledger.entries(site.dataset_id))
    assert steps == [5, 5, 7]     # round 1's federated and alone steps, the last round's fine-tuning
    assert len({s.noise_multiplier for s in ledger.entries(site.dataset_id)}) == 1
    # a whole run at that noise (every step the site takes) reaches the target, no more
    full = [(e.noise_multiplier, e.sample_rate, cfg.site_dp_steps) for e in ledger.entries(site.dataset_id)[:1]]
    from fedcare.accounting import epsilon_of

    assert 7.5 < epsilon_of(full, 1e-4, cfg.dp.accountant) <= 8.0 + 1e-6


def test_bootstrap_resamples_use_the_metric_definitions_and_bracket_the_estimate():
    rng = np.random.default_rng(3)
    for classes in (2, 5):
        labels = rng.integers(0, classes, 120)
        labels[:classes] = np.arange(classes)
        scores = rng.dirichlet(np.ones(classes), 120)
        scores[np.arange(120), labels] += rng.random(120)         # better than chance
        scores /= scores.sum(axis=1, keepdims=True)
        same = _weighted_metrics(np.ones((1, 120)), scores, labels, classes)
        exact = classification_metrics(scores, labels)
        for k, v in same.items():
            assert v[0] == pytest.approx(exact[k], abs=1e-12), k
        m = bootstrap_metrics(scores, labels, 400, seed=1)
        for k in ("accuracy", "balanced_accuracy", "macro_f1") + (("auroc",) if classes == 2 else ()):
            assert m[f"{k}_lo"] < m[k] < m[f"{k}_hi"], k
        assert 0.05 < m["accuracy_hi"] - m["accuracy_lo"] < 0.3    # ~ 4 standard errors at n=120


def test_wilson_interval_values():
    # reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson"))
    assert wilson(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert wilson(45, 69) == pytest.approx((0.53447, 0.75382), abs=1e-4)
    assert wilson(0, 0) is None


def test_budget_zero_is_shown_as_no_cap():
    from fedcare.server.queries import budget_label

    assert budget_label(0.0) == "no cap" and budget_label(None) == "no cap"
    assert budget_label(8.0) == "8"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_simulation_with_the_alone_baseline_prints_and_reports_the_benefit(tmp_path, monkeypatch):
    from e2e import fedcare
    from streamlit.testing.v1 import AppTest

    db = f"sqlite:///{tmp_path / 'b.db'}"
    run = fedcare("simulate", "--quiet", "--db", db, "--task", "heart-disease", "--rounds", "1",
                  "--set", "personalize.method=finetune", "--set", "train.local_steps=10", "--baselines", "alone")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "benefit of joining" in run.stdout and "balanced_accuracy" in run.stdout
    run_id = re.search(r"run (run-\S+) completed", run.stdout).group(1)
    benefit = json.loads(fedcare("report", run_id, "--db", db, "--json").stdout)["benefit"]
    assert benefit["round"] == 1 and set(benefit["sites"]) == {"cleveland", "hungary", "switzerland", "va"}
    for site, entry in benefit["sites"].items():
        assert {"global", "personal", "alone"} <= set(entry)
        ba = entry["personal"]["balanced_accuracy"]
        assert ba["lo"] <= ba["value"] <= ba["hi"]
        assert entry["n"] > 0
    assert benefit["sites"]["cleveland"]["prevalence"]   # large enough to publish its classes
    # the dashboard's Benefit page shows the same numbers, prevalence beside them
    monkeypatch.setenv("FEDCARE_DB", db)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120)
    at.session_state["fedcare_run"] = run_id
    at.run()
    at.switch_page("views/benefit.py").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert set(table["site"]) == set(benefit["sites"]) and "class prevalence" in table
    ba = benefit["sites"]["hungary"]["personal"]["balanced_accuracy"]["value"]
    assert table.set_index("site").loc["hungary", "personal balanced_accuracy"].startswith(f"{ba:.3f}")
    assert at.get("plotly_chart")
