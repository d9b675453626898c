"""End to end: a real Flower simulation whose rounds are securely aggregated, with
distributed DP and a site that crashes, and a deployed federation (TLS SuperLink,
authenticated SuperNodes) doing the same; the coordinator stores only sums."""
import numpy as np
import pytest

from e2e import simulate
from test_deploy_e2e import FAST, start_federation

pytestmark = pytest.mark.e2e


def test_heart_disease_secure_aggregation_with_distributed_dp_and_a_crashed_site(tmp_path):
    db = f"sqlite:///{tmp_path}/fed.db"
    _, rep = simulate(db, "--task", "heart-disease", "--rounds", "2", "--set", "secagg.enabled=true",
                      "--set", "secagg.epsilon=8", "--set", "faults.site=va", "--set", "faults.kind=crash",
                      workdir=tmp_path)
    assert rep["status"] == "completed" and [r["round"] for r in rep["rounds"]] == [1, 2]
    for r in rep["rounds"]:
        m = r["metrics"]
        sites = {s["site"]: s for s in r["sites"]}
        assert sites.pop("va")["accepted"] is False
        assert all(s["accepted"] for s in sites.values())
        # keys, sealed shares, the masked input (15 uint32) and revealed shares: more than a plain 14 floats
        assert all(s["update_bytes"] > 14 * 4 for s in sites.values())
        assert (m["secagg_survivors"], m["secagg_threshold"], m["aggregated"]) == (3.0, 2.0, 1.0)
        assert m["secagg_weight"] == 3.0            # distributed DP: every site weighs 1
        assert 0 < m["secagg_epsilon"] <= 8.0 and np.isfinite(m["eval"]["accuracy"])
        # each site's own accountant (its reply and audit log) agrees with the coordinator's
        assert all(s["metrics"]["secagg_epsilon"] == pytest.approx(m["secagg_epsilon"]) for s in sites.values())
    assert rep["rounds"][0]["metrics"]["secagg_epsilon"] < rep["rounds"][1]["metrics"]["secagg_epsilon"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Its own small federation: every site in fedcare's warm executor (flwr's per-message
    ClientApp process would start a process for each of a secure round's 5 messages per
    site); VA's policy requires secure aggregation."""
    f = start_federation(tmp_path_factory.mktemp("secagg-deploy"),
                         {"cleveland": None, "hungarian": None,
                          "va": "[privacy]\nrequire_secure_aggregation = true\n"}, warm_task="heart-disease")
    try:
        yield f
    finally:
        f.close()


def test_deployed_hospitals_aggregate_securely_over_tls(fed):
    """Real SuperLink with TLS and authenticated SuperNodes: the protocol's state survives
    between messages at every site. One round, one local step."""
    out = fed.fedcare("server", "run", "--task", "heart-disease", "--rounds", "1", "--quiet", *FAST,
                      "--set", "train.local_steps=1", "--set", "secagg.enabled=true")
    assert out.returncode == 0, out.stdout + out.stderr
    rep = fed.report(out.stdout.split()[1].rstrip(":"))
    m, sites = rep["rounds"][0]["metrics"], rep["rounds"][0]["sites"]
    assert rep["status"] == "completed" and all(s["accepted"] for s in sites), sites
    assert (m["secagg_survivors"], m["aggregated"]) == (3.0, 1.0)
    assert list(rep["secure_aggregation"]["survivors"].values()) == [3.0]
    from fedcare.client.audit import AuditLog

    for spec in fed.sites.values():
        decisions = [e["decision"] for e in AuditLog(spec.audit).entries() if e["kind"] == "train"]
        assert decisions[-1] == "masked"
