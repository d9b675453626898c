"""Deployment end to end with real processes on loopback: a SuperLink with TLS and
SuperNode authentication, three hospital SuperNodes (Fed-Heart-Disease centres, each
reading its own data folder), `fedcare server run/resume`, site policy and audit.

Every process started here is stopped in the fixture's teardown.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedcare.certs import create_site_keys, init_server
from fedcare.flower import free_port
from fedcare.server.deploy import (DeploymentError, SiteSpec, TlsFiles, check_superlink_reachable,
                                   register_site, start_site, start_superlink, start_supernode,
                                   wait_joined, write_connection)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
CENTRES = {"cleveland": "processed.cleveland.data", "hungarian": "processed.hungarian.data",
           "va": "processed.va.data"}
FEDCARE = shutil.which("fedcare") or "fedcare"
FAST = ["--set", "train.local_steps=5", "--set", "strategy.min_sites=2", "--set", "strategy.round_timeout=90"]


class Federation:
    def __init__(self, root: Path):
        self.root = root
        self.processes = []
        self.tls = init_server(root / "tls", ["localhost"], ["127.0.0.1"])
        self.other_ca = init_server(root / "other-tls", ["localhost"], ["127.0.0.1"])
        self.flwr_home = root / "flwr-home"
        self.db = f"sqlite:///{root / 'store.db'}"
        self.env = {**os.environ, "FEDCARE_FLWR_HOME": str(self.flwr_home),
                    "FEDCARE_WORKDIR": str(root / "runs"), "FEDCARE_DB": self.db}
        self.sites: dict[str, SiteSpec] = {}
        self.nodes = {}
        self.executors = {}

    def site_spec(self, site: str, policy: str | None = None) -> SiteSpec:
        folder = self.root / "sites" / site
        data = folder / "data"
        data.mkdir(parents=True)
        shutil.copy(ROOT / "data" / "heart-disease" / CENTRES[site], data)
        keys = create_site_keys(site, folder / "keys")
        pol = None
        if policy is not None:
            pol = folder / "policy.toml"
            pol.write_text(policy)
        return SiteSpec(site_id=site, node_key=keys.private_key, data_path=data, ledger=folder / "ledger.db",
                        policy=pol, audit=folder / "audit.jsonl", port=free_port())

    def fedcare(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([FEDCARE, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def spawn_fedcare(self, *args: str, log: Path) -> subprocess.Popen:
        out = open(log, "w")
        proc = subprocess.Popen([FEDCARE, *args], env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def store(self):
        from fedcare.server.store import Store

        return Store(self.db)

    def report(self, run_id: str) -> dict:
        out = self.fedcare("report", run_id, "--db", self.db, "--json", timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        # the sites at once (each may take its grace period to go), then the SuperLink
        with ThreadPoolExecutor(max(1, len(self.nodes) + len(self.executors))) as pool:
            list(pool.map(lambda managed: managed.stop(), [*self.nodes.values(), *self.executors.values()]))
        if getattr(self, "link", None):
            self.link.stop()


def start_federation(root: Path, policies: dict[str, str | None], per_message: tuple[str, ...] = (),
                     warm_task: str | None = None) -> Federation:
    """A TLS SuperLink and one authenticated SuperNode per site in ``policies`` (site ->
    policy text or None); sites in ``per_message`` keep flwr's per-message ClientApp
    process, the others run fedcare's executor (with ``warm_task``'s model and the site's
    data loaded before the first message). The caller closes it."""
    if not all((ROOT / "data" / "heart-disease" / CENTRES[s]).exists() for s in policies):
        pytest.fail("bundled heart-disease data missing")
    f = Federation(root)
    try:
        f.port = free_port()
        f.address = f"127.0.0.1:{f.port}"
        f.link = start_superlink(TlsFiles.from_dir(f.root / "tls"), f.root / "state" / "superlink.db",
                                 f.root / "logs", port=f.port, flwr_home=f.flwr_home)
        write_connection(f.flwr_home, f.address, f.tls.ca_cert)
        f.sites = {site: f.site_spec(site, policy) for site, policy in policies.items()}
        for spec in f.sites.values():
            assert register_site(Path(f"{spec.node_key}.pub"), f.flwr_home) > 0
        with ThreadPoolExecutor(len(f.sites)) as pool:   # the sites start at once
            started = dict(zip(f.sites, pool.map(
                lambda name: start_site(f.sites[name], f.address, f.tls.ca_cert, f.root / "logs",
                                        executor=name not in per_message, flwr_home=f.flwr_home,
                                        warm_task=warm_task), f.sites)))
        for name, (f.nodes[name], executor) in started.items():
            if executor is not None:
                f.executors[name] = executor
        ids = {name: wait_joined(node, 120) for name, node in f.nodes.items()}
        assert len(set(ids.values())) == len(policies)
        return f
    except BaseException:
        f.close()
        raise


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    # the VA hospital only takes part in differentially private runs;
    # hungarian keeps flwr's per-message ClientApp process
    f = start_federation(tmp_path_factory.mktemp("deploy"),
                         {"cleveland": None, "hungarian": None,
                          "va": "[privacy]\nrequire_dp = true\n[data]\nmin_local_examples = 20\n"},
                         per_message=("hungarian",))
    try:
        yield f
    finally:
        f.close()


def test_unregistered_key_is_refused(fed):
    folder = fed.root / "intruder"
    keys = create_site_keys("intruder", folder)
    (folder / "data").mkdir()
    shutil.copy(ROOT / "data" / "heart-disease" / CENTRES["va"], folder / "data")
    out = fed.fedcare("site", "start", "--site-id", "intruder", "--data", str(folder / "data"),
                      "--superlink", fed.address, "--root-cert", str(fed.tls.ca_cert),
                      "--node-key", str(keys.private_key), "--ledger", str(folder / "ledger.db"),
                      "--port", str(free_port()), "--workdir", str(folder / "work"), timeout=400)
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "not registered" in err[0], out.stderr
    assert "trying again in 5 s" in out.stdout   # a key the coordinator may still register


def test_wrong_ca_cannot_connect(fed):
    spec = SiteSpec("hungarian", fed.sites["hungarian"].node_key, port=free_port())
    with pytest.raises(DeploymentError, match="does not verify"):
        check_superlink_reachable(fed.address, fed.other_ca.ca_cert)
    # and Flower's own SuperNode refuses the handshake (no pre-check)
    node = start_supernode(spec, fed.address, fed.other_ca.ca_cert, fed.root / "wrong-ca", precheck=False,
                           max_retries=1, max_wait=20, flwr_home=fed.flwr_home)
    try:
        with pytest.raises(DeploymentError, match="not signed by the given root certificate"):
            wait_joined(node, 90)
    finally:
        node.stop()


def test_bad_input_one_line_errors(fed):
    out = fed.fedcare("server", "run", "--rounds", "1", "--flwr-home", str(fed.root / "nowhere"))
    assert out.returncode == 2 and "no SuperLink connection" in out.stderr
    before = fed.fedcare("runs", "--json").stdout
    dead = fed.root / "dead-home"
    write_connection(dead, f"127.0.0.1:{free_port()}", fed.tls.ca_cert)
    out = fed.fedcare("server", "run", "--rounds", "1", "--flwr-home", str(dead))
    assert out.returncode == 2 and "cannot reach the SuperLink" in out.stderr
    assert fed.fedcare("runs", "--json").stdout == before  # nothing partial in the store
    bad = fed.root / "bad-data"
    bad.mkdir()
    (bad / "notes.txt").write_text("not heart data")
    out = fed.fedcare("site", "start", "--site-id", "x", "--data", str(bad), "--task", "heart-disease",
                      "--superlink", fed.address, "--root-cert", str(fed.tls.ca_cert),
                      "--node-key", str(fed.sites["va"].node_key), "--ledger", str(fed.root / "x.db"))
    assert out.returncode == 2 and str(bad) in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_run_with_a_policy_refusal_fills_store_and_audit(fed):
    out = fed.fedcare("server", "run", "--task", "heart-disease", "--rounds", "1", "--quiet", *FAST)
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.split()[1].rstrip(":")
    rep = fed.report(run_id)
    assert rep["status"] == "completed" and len(rep["rounds"]) == 1
    sites = {s["site"]: s for s in rep["rounds"][0]["sites"]}
    assert sites["cleveland"]["accepted"] and sites["hungarian"]["accepted"], sites
    assert sites["cleveland"]["num_examples"] == 199 and sites["hungarian"]["num_examples"] == 172
    assert not sites["va"]["accepted"] and "differential privacy is required" in sites["va"]["reason"]
    assert set(rep["final"]["per_site"]) == {"cleveland", "hungarian"}

    from fedcare.client.audit import AuditLog

    va_log = AuditLog(fed.sites["va"].audit)
    entries = [e for e in va_log.entries() if e["run_id"] == run_id]
    fingerprint = hashlib.sha256(fed.sites["va"].policy.read_bytes()).hexdigest()
    # VA's policy refuses the run, and a site that refused to train is not asked to evaluate
    assert [(e["kind"], e["decision"]) for e in entries] == [("train", "refused")]
    assert all(e["policy_fingerprint"] == fingerprint for e in entries)
    assert "handled train" in fed.executors["cleveland"].log()  # cleveland's tasks ran in its executor
    assert "handled train" in fed.executors["va"].log()
    assert fed.nodes["hungarian"].find("flower-superexec") and not fed.nodes["cleveland"].find("flower-superexec")
    sent = [e for e in AuditLog(fed.sites["cleveland"].audit).entries() if e["kind"] == "train"]
    assert sent and sent[0]["bytes"] == sites["cleveland"]["update_bytes"] and len(sent[0]["payload_sha256"]) == 64

    ok = fed.fedcare("site", "audit", "--log", str(fed.sites["va"].audit), "--verify", timeout=120)
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    copy = fed.root / "edited.jsonl"
    lines = fed.sites["va"].audit.read_text().splitlines()
    first = json.loads(lines[0])
    first["decision"] = "sent"
    copy.write_text("\n".join([json.dumps(first, sort_keys=True), *lines[1:]]) + "\n")
    shutil.copy(f"{fed.sites['va'].audit}.head", f"{copy}.head")
    bad = fed.fedcare("site", "audit", "--log", str(copy), "--verify", timeout=120)
    assert bad.returncode == 1 and "edited" in bad.stderr


def test_deployed_sites_refuse_fault_injection_with_the_reason(fed):
    out = fed.fedcare("server", "run", "--task", "heart-disease", "--rounds", "1", "--quiet", *FAST,
                      "--set", "faults.site=cleveland", "--set", "faults.kind=hang")
    # every site refused: the run is stored as failed and `server run` exits 1 with why
    assert out.returncode == 1 and "no site sent an accepted update" in out.stderr, out.stdout + out.stderr
    rep = fed.report(out.stdout.split()[1].rstrip(":"))
    assert rep["status"] == "failed"
    sites = {s["site"]: s for s in rep["rounds"][0]["sites"]}
    assert set(sites) == {"cleveland", "hungarian", "va"}
    assert all(not s["accepted"] and "fault injection (faults.kind=hang) runs only in simulation" in s["reason"]
               for s in sites.values()), sites


def test_a_node_registered_as_one_site_cannot_answer_as_another(fed):
    """Mallory's key is registered as 'mallory'; its SuperNode starts with site-id
    'cleveland'. The server attributes its replies to mallory and rejects them."""
    folder = fed.root / "sites" / "mallory"
    data = folder / "data"
    data.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "heart-disease" / CENTRES["hungarian"], data)
    keys = create_site_keys("mallory", folder / "keys")
    node_id = register_site(keys.public_key, fed.flwr_home)
    assert json.loads((fed.flwr_home / "fedcare-sites.json").read_text())[str(node_id)] == "mallory"
    spec = SiteSpec(site_id="cleveland", node_key=keys.private_key, data_path=data, port=free_port())
    node = start_supernode(spec, fed.address, fed.tls.ca_cert, folder / "logs", flwr_home=fed.flwr_home)
    try:
        assert wait_joined(node, 120) == node_id
        # a generous round timeout: the test is about who is who, not about speed
        out = fed.fedcare("server", "run", "--task", "heart-disease", "--rounds", "1", "--quiet", *FAST,
                          "--set", "strategy.round_timeout=900", timeout=1800)
        assert out.returncode == 0, out.stdout + out.stderr
        rep = fed.report(out.stdout.split()[1].rstrip(":"))
    finally:
        node.stop()
    sites = {s["site"]: s for s in rep["rounds"][0]["sites"]}
    assert sites["cleveland"]["accepted"], sites
    assert not sites["mallory"]["accepted"]
    assert sites["mallory"]["reason"] == (f"reply claims site 'cleveland' but node {node_id} "
                                          "is registered as 'mallory'")


def _wait(cond, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_serverapp_killed_resumed_and_a_site_dropping_out(fed):
    dp = ["--set", "dp.noise_multiplier=1.0", "--set", "dp.delta=0.001", "--set", "dp.accountant=rdp"]
    run = fed.spawn_fedcare("server", "run", "--rounds", "2", "--quiet", *FAST, *dp, log=fed.root / "run2.log")
    store = fed.store()
    try:
        run_id = _wait(lambda: next((r["run_id"] for r in store.list_runs() if r.get("rounds_planned") == 2
                                     and r["status"] in ("pending", "running")), None), 120, "the run to start")
        _wait(lambda: store.last_round(run_id) >= 1, 400, "round 1 to be committed")
        serverapps = _wait(lambda: fed.link.find("flwr-serverapp"), 30, "the ServerApp process")
        for pid in serverapps:
            os.kill(pid, 9)  # the coordinator's ServerApp crashes mid-run
        assert run.wait(180) != 0
        assert store.last_round(run_id) == 1 and store.get_run(run_id)["status"] != "completed"

        resume = fed.spawn_fedcare("server", "resume", run_id, "--quiet", log=fed.root / "resume.log")
        _wait(lambda: any(e["kind"] == "resumed" for e in store.events(run_id)), 300, "the resumed ServerApp")
        fed.nodes["hungarian"].kill()  # a hospital drops out in the middle of round 2
        assert resume.wait(600) == 0, (fed.root / "resume.log").read_text()[-3000:]
    finally:
        store.close()

    rep = fed.report(run_id)
    assert rep["status"] == "completed"
    assert [r["round"] for r in rep["rounds"]] == [1, 2]  # no round counted twice
    assert {s["site"] for s in rep["rounds"][0]["sites"] if s["accepted"]} == {"cleveland", "hungarian", "va"}
    last = rep["rounds"][-1]["sites"]
    assert {s["site"] for s in last if s["accepted"]} == {"cleveland", "va"}, (last, rep.get("events"))
    dropped = [s for s in last if not s["accepted"]]
    assert len(dropped) == 1 and dropped[0]["reason"], last  # recorded, with why
    with fed.store() as store:
        kinds = [e["kind"] for e in store.events(run_id)]
    assert "resumed" in kinds
    from fedcare.client.ledger import SiteLedger

    for name in ("cleveland", "va"):
        spends = SiteLedger(fed.sites[name].ledger).entries(run_id=run_id)
        rounds_charged = {s.round for s in spends}
        accepted = {r["round"] for r in rep["rounds"] for s in r["sites"] if s["site"] == name and s["accepted"]}
        assert accepted <= rounds_charged <= {1, 2}, (name, accepted, rounds_charged)
