"""The site privacy ledger: lifetime epsilon from the whole history, persistence across
runs, retries, bad files, and the `fedcare site privacy` view."""
from __future__ import annotations

import json
import sqlite3

import pytest
from opacus.accountants import create_accountant
from typer.testing import CliRunner

from fedcare.client.cli import site_app
from fedcare.client.ledger import SiteLedger, epsilon_of, ledger_path_for
from fedcare.errors import PrivacyError

HISTORY = [(1.0, 0.05, 30), (1.5, 0.02, 20), (1.0, 0.05, 30), (2.0, 0.1, 10)]


def _record(ledger: SiteLedger, run: str, rounds, dataset="cleveland", event=(1.0, 0.05, 30), delta=1e-5,
            accountant="rdp", budget=0.0):
    for r in rounds:
        ledger.record(dataset, run, r, *event, delta=delta, accountant=accountant, budget=budget)


def _opacus_step_by_step(history, mechanism: str) -> float:
    """An accountant fed one optimiser step at a time, as Opacus does during training."""
    acc = create_accountant(mechanism=mechanism)
    for nm, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=nm, sample_rate=q)
    return acc.get_epsilon(delta=1e-5)


@pytest.mark.parametrize("mechanism,rel", [("rdp", 1e-9), ("prv", 1e-4)])
def test_ledger_epsilon_equals_accountant_from_scratch(tmp_path, mechanism, rel):
    ledger = SiteLedger(tmp_path / "site.ledger.sqlite")
    for i, (nm, q, steps) in enumerate(HISTORY, 1):
        ledger.record("hungary", "run-a", i, nm, q, steps, delta=1e-5, accountant=mechanism)
    assert ledger.history("hungary") == HISTORY
    expected = _opacus_step_by_step(HISTORY, mechanism)
    assert ledger.epsilon("hungary", 1e-5, mechanism) == pytest.approx(expected, rel=rel)
    assert expected > 1.0  # a real spend, not a trivially small number


def test_two_runs_accumulate_and_survive_reopening(tmp_path):
    path = tmp_path / "ledgers" / "va.ledger.sqlite"   # parent folder is created
    _record(SiteLedger(path), "run-1", [1, 2, 3])
    first = SiteLedger(path).epsilon("cleveland", 1e-5, "rdp")
    _record(SiteLedger(path), "run-2", [1, 2, 3])       # a second run, a fresh ledger object
    ledger = SiteLedger(path)
    lifetime = ledger.epsilon("cleveland", 1e-5, "rdp")
    run2 = ledger.epsilon("cleveland", 1e-5, "rdp", run_id="run-2")
    assert run2 == pytest.approx(first)                 # same spend pattern, same run epsilon
    assert lifetime > first * 1.2                       # ...but the lifetime account keeps growing
    assert lifetime == pytest.approx(epsilon_of([(1.0, 0.05, 30)] * 6, 1e-5, "rdp"))
    (summary,) = ledger.summary()
    assert [r["run_id"] for r in summary["runs"]] == ["run-1", "run-2"]
    assert summary["steps"] == 180 and summary["epsilon"] == pytest.approx(lifetime)


def test_datasets_have_separate_accounts(tmp_path):
    ledger = SiteLedger(tmp_path / "l.sqlite")
    _record(ledger, "run-1", [1, 2], dataset="a")
    _record(ledger, "run-1", [1], dataset="b")
    assert ledger.epsilon("a", 1e-5, "rdp") > ledger.epsilon("b", 1e-5, "rdp") > 0
    assert ledger.epsilon("never-trained", 1e-5, "rdp") == 0.0


def test_retried_round_counts_again(tmp_path):
    ledger = SiteLedger(tmp_path / "l.sqlite")
    _record(ledger, "run-1", [1, 2])
    _record(ledger, "run-1", [2])   # round 2 trained again after a crash before sending
    attempts = [(e.round, e.attempt) for e in ledger.entries("cleveland")]
    assert attempts == [(1, 1), (2, 1), (2, 2)]
    assert ledger.epsilon("cleveland", 1e-5, "rdp") == pytest.approx(epsilon_of([(1.0, 0.05, 30)] * 3, 1e-5, "rdp"))


def test_remaining(tmp_path):
    ledger = SiteLedger(tmp_path / "l.sqlite")
    _record(ledger, "run-1", [1])
    spent = ledger.epsilon("cleveland", 1e-5, "rdp")
    assert ledger.remaining("cleveland", 10.0, 1e-5, "rdp") == pytest.approx(10.0 - spent)
    assert ledger.remaining("cleveland", spent / 2, 1e-5, "rdp") == 0.0
    assert ledger.remaining("cleveland", 0.0, 1e-5, "rdp") == float("inf")


def test_bad_spend_is_rejected(tmp_path):
    ledger = SiteLedger(tmp_path / "l.sqlite")
    with pytest.raises(ValueError):
        ledger.record("d", "r", 1, 0.0, 0.1, 10, 1e-5, "rdp")   # no noise is not a DP spend
    with pytest.raises(ValueError):
        ledger.record("d", "r", 1, 1.0, 0.1, 0, 1e-5, "rdp")
    assert ledger.entries() == []


def test_corrupt_file_names_the_path(tmp_path):
    bad = tmp_path / "site.ledger.sqlite"
    bad.write_bytes(b"this is not an SQLite database at all" * 50)
    with pytest.raises(PrivacyError, match=str(bad)):
        SiteLedger(bad)


def test_other_sqlite_file_is_not_a_ledger(tmp_path):
    other = tmp_path / "fedcare.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE runs (id TEXT)")
    con.commit()
    con.close()
    with pytest.raises(PrivacyError, match="not a fedcare privacy ledger"):
        SiteLedger(other)


def test_directory_is_not_a_ledger(tmp_path):
    with pytest.raises(PrivacyError, match=str(tmp_path)):
        SiteLedger(tmp_path)


def test_ledger_path_for(tmp_path):
    assert ledger_path_for(tmp_path, "site-2") == tmp_path / "site-2.ledger.sqlite"


def test_site_privacy_command(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = SiteLedger(path)
    _record(ledger, "run-1", [1, 2], budget=8.0)
    _record(ledger, "run-2", [1], budget=8.0)
    runner = CliRunner()
    res = runner.invoke(site_app, ["privacy", "--ledger", str(path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    (ds,) = doc["datasets"]
    assert ds["dataset_id"] == "cleveland" and ds["budget"] == 8.0
    assert ds["epsilon"] == pytest.approx(ledger.epsilon("cleveland", 1e-5, "rdp"))
    assert ds["remaining"] == pytest.approx(8.0 - ds["epsilon"])
    assert [(r["run_id"], r["rounds"], r["steps"]) for r in ds["runs"]] == [("run-1", 2, 60), ("run-2", 1, 30)]
    table = runner.invoke(site_app, ["privacy", "--ledger", str(path)])
    assert table.exit_code == 0 and "run-2" in table.output and "cleveland" in table.output


def test_site_privacy_command_missing_ledger(tmp_path):
    res = CliRunner().invoke(site_app, ["privacy", "--ledger", str(tmp_path / "nope.sqlite")])
    assert isinstance(res.exception, PrivacyError)
    assert not (tmp_path / "nope.sqlite").exists()   # looking never creates a ledger
