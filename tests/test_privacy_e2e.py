"""End to end: DP-SGD at every site, one ledger per site across runs, budget refusals."""
import json

import pytest
from opacus.accountants import PRVAccountant

from e2e import fedcare, simulate

pytestmark = pytest.mark.e2e

DP = ["--rounds", "1", "--set", "dp.noise_multiplier=1.0", "--set", "train.local_steps=20"]


def test_two_runs_accumulate_on_one_ledger_and_a_site_past_its_cap_is_refused(tmp_path):
    db = f"sqlite:///{tmp_path}/fed.db"
    ledgers = tmp_path / "ledgers"
    run1, rep1 = simulate(db, "--ledger-dir", str(ledgers), *DP)
    p1 = rep1["privacy"]
    assert set(p1) == {"cleveland", "hungary", "switzerland", "va"}
    for site, p in p1.items():
        assert p["epsilon"] == pytest.approx(p["run_epsilon"]) and p["steps"] == 20
        assert p["noise_multiplier"] == 1.0 and p["accountant"] == "prv" and p["delta"] == 1e-5
    # Switzerland (30 training records) spends far more per step than the others.
    cap = 5.0
    assert p1["switzerland"]["epsilon"] < cap

    run2, rep2 = simulate(db, "--ledger-dir", str(ledgers), *DP, "--set", f"site.budget={cap}")
    (rnd,) = rep2["rounds"]
    sites = {s["site"]: s for s in rnd["sites"]}
    assert sites["switzerland"]["status"] == "refused"
    assert "site budget exceeded" in sites["switzerland"]["reason"]
    assert all(sites[s]["accepted"] for s in ("cleveland", "hungary", "va"))
    assert rnd["metrics"]["aggregated"] == 1.0
    assert any(e["kind"] == "site_refused" for e in rep2["events"])
    p2 = rep2["privacy"]
    for site in ("cleveland", "hungary", "va"):
        # lifetime epsilon grows across runs; this run alone spent what run 1 did
        assert p2[site]["epsilon"] > p1[site]["epsilon"]
        assert p2[site]["run_epsilon"] == pytest.approx(p1[site]["run_epsilon"], rel=1e-6)
        assert p2[site]["budget"] == cap
        # the lifetime figure is an accountant over the whole history, not a per-run sum
        acc = PRVAccountant()
        acc.history = [(1.0, p2[site]["sample_rate"], 40)]
        assert p2[site]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-3)
        assert p2[site]["epsilon"] < p1[site]["epsilon"] + p2[site]["run_epsilon"]

    # the refused round spent nothing: Switzerland's ledger holds run 1 only
    res = fedcare("site", "privacy", "--ledger", str(ledgers / "switzerland.ledger.sqlite"), "--json")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert run1 in text and run2 not in text
    assert json.loads(text)
