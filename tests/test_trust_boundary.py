"""The trust boundary, through the real ServerApp round loop and ClientApp handlers
(``InProcessGrid``: the same Flower messages, no SuperLink). A hostile site's reply is
made by tampering with a real reply on its way to the server; a hostile coordinator is
a run config that asks for what the site's node config and policy do not allow.
Each test: the bad part is refused or rejected with its reason, the others finish."""
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedcare import schemas as S
from fedcare.launch import resolve_config
from fedcare.server.federation import run_federation
from fedcare.server.local_grid import InProcessGrid
from fedcare.server.store import Store

HEART = ["cleveland", "hungary", "switzerland", "va"]


class TamperingGrid(InProcessGrid):
    """Real replies; ``tamper(round, kind, node, reply, history)`` may rewrite one on its
    way (``history``: the node's earlier (kind, content) as it sent them)."""

    def __init__(self, cfg, num_sites, tamper=None, node_configs=None):
        super().__init__(cfg, num_sites)
        self.tamper = tamper
        self.history: dict[int, list] = {}
        self.round = {"train": 0, "evaluate": 0}
        for node, nc in (node_configs or {}).items():
            self._contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(),
                                           run_config=self._contexts[node].run_config, node_config=nc)

    # the round loop pushes messages and pulls replies (server/federation.py _send_and_collect)
    def push_messages(self, messages):
        messages = list(messages)
        self.kind = messages[0].metadata.message_type.split(".")[0] if messages else "train"
        self.round[self.kind] += 1
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        kind, out = self.kind, []
        for r in super().pull_messages(message_ids):
            node = r.metadata.src_node_id
            sent = None if r.has_error() else r.content   # as the site sent it
            if self.tamper is not None:
                r = self.tamper(self.round[kind], kind, node, r, self.history.get(node, []))
            self.history.setdefault(node, []).append((kind, sent))
            out.append(r)
        return out


def _run(tmp_path, grid_factory, sets=(), rounds=2, sites_file=""):
    cfg = resolve_config("heart-disease", ["train.local_steps=2", *sets], rounds=rounds, seed=3)
    cfg.runtime.db = f"sqlite:///{tmp_path}/trust.db"
    cfg.runtime.sites_file = sites_file
    run_id = run_federation(grid_factory(cfg), cfg)
    store = Store(cfg.runtime.db)
    try:
        return (store.get_run(run_id), store.site_rounds(run_id), store.events(run_id),
                store.evaluations(run_id), store.rounds(run_id))
    finally:
        store.close()


def _by_round(rows):
    out: dict[int, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["round"], {})[r["site"]] = r
    return out


def _with_site_info(reply, **changes):
    """The reply with its SITE record's entries changed (None deletes one)."""
    records = dict(reply.content.items())
    info = dict(records[S.SITE].items())
    for k, v in changes.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    records[S.SITE] = ConfigRecord(info)
    reply.content = RecordDict(records)
    return reply


def _with_record(reply, key, record):
    records = dict(reply.content.items())
    records[key] = record
    reply.content = RecordDict(records)
    return reply


# ----------------------------------------------------------------------------- hostile site
def test_a_hostile_site_is_rejected_with_its_reason_and_the_others_finish(tmp_path):
    """Node 1000+i is HEART[i]. Round 1: hungary sends malformed privacy JSON, switzerland
    metrics of the wrong type, va an oversized array. Round 2: hungary claims to be
    cleveland, switzerland replays its round-1 reply, va sends malformed fairness JSON
    in evaluation. Cleveland is honest throughout."""
    def tamper(rnd, kind, node, reply, history):
        site = HEART[node - 1000]
        if kind == "train" and rnd == 1:
            if site == "hungary":
                return _with_site_info(reply, **{S.PRIVACY_JSON: "{not json"})
            if site == "switzerland":
                metrics = dict(reply.content[S.METRICS].items())
                info = dict(reply.content[S.SITE].items())
                info[S.REASON] = 7           # a number where text belongs is ignored for an ok reply
                rec = MetricRecord({k: v for k, v in metrics.items() if k != S.NUM_EXAMPLES})
                reply = _with_record(reply, S.METRICS, rec)
                return _with_site_info(reply, **{S.SITE_ID: 12345})
            if site == "va":
                big = Array(np.zeros((4096, 4096), dtype=np.float32))   # 64 MiB, declared (4096, 4096)
                arrays = dict(reply.content[S.ARRAYS].items())
                arrays[next(iter(arrays))] = big
                return _with_record(reply, S.ARRAYS, ArrayRecord(arrays))
        if kind == "train" and rnd == 2:
            if site == "hungary":
                return _with_site_info(reply, **{S.SITE_ID: "cleveland"})
            if site == "switzerland":
                reply.content = [content for k, content in history if k == "train"][0]
                return reply
        if kind == "evaluate" and site == "va":
            return _with_site_info(reply, **{S.FAIRNESS_JSON: "[1, 2"})
        return reply

    run, rows, events, evals, rounds = _run(tmp_path, lambda cfg: TamperingGrid(cfg, 4, tamper),
                                            sets=["strategy.min_sites=1", "dp.epsilon=50",
                                                  f"site.ledger_dir={tmp_path / 'ledgers'}"])
    assert run["status"] == "completed"
    r = _by_round(rows)
    assert all(r[n]["cleveland"]["status"] == S.ACCEPTED for n in (1, 2))
    assert r[1]["hungary"]["status"] == S.REJECTED and "privacy_json is not valid JSON" in r[1]["hungary"]["reason"]
    assert r[1]["node-1002"]["status"] == S.REJECTED and "site_id" in r[1]["node-1002"]["reason"]
    assert r[1]["va"]["status"] == S.REJECTED and "declares shape (4096, 4096)" in r[1]["va"]["reason"]
    assert r[2]["hungary"]["status"] == S.REJECTED
    assert "claims site 'cleveland'" in r[2]["hungary"]["reason"]
    assert r[2]["switzerland"]["status"] == S.REJECTED and "nonce" in r[2]["switzerland"]["reason"]
    assert r[2]["va"]["status"] == S.ACCEPTED
    bad_eval = [e["message"] for e in events if e["kind"] == "evaluate_rejected"]
    assert bad_eval and all("va" in m and "fairness_json" in m for m in bad_eval)
    assert {e["scope"] for e in evals} >= {"global", "cleveland", "hungary", "switzerland"}
    assert all(rd["metrics"]["aggregated"] == 1.0 for rd in rounds)


def test_a_bad_evaluation_riding_on_a_train_reply_is_rejected_alone(tmp_path):
    """With ``strategy.evaluate_with_train`` a train reply carries the evaluation of the
    last round's model. In round 2 hungary's evaluation has malformed metrics and va's a
    replayed nonce: each evaluation is rejected with its reason, their training updates
    are still aggregated, and round 1's model is evaluated by the other sites."""
    def tamper(rnd, kind, node, reply, history):
        site = HEART[node - 1000]
        if kind == "train" and rnd == 2 and site == "hungary":
            evaluation = dict(reply.content[S.EVALUATION].items())
            evaluation[S.METRICS_JSON] = json.dumps({"accuracy": "high"})
            return _with_record(reply, S.EVALUATION, ConfigRecord(evaluation))
        if kind == "train" and rnd == 2 and site == "va":
            return _with_site_info(reply, **{S.NONCE: "0" * 32})
        return reply

    run, rows, events, evals, rounds = _run(tmp_path, lambda cfg: TamperingGrid(cfg, 4, tamper), rounds=3,
                                            sets=["strategy.min_sites=1", "strategy.evaluate_with_train=true"])
    assert run["status"] == "completed"
    r = _by_round(rows)
    assert r[2]["hungary"]["status"] == S.ACCEPTED
    assert r[2]["va"]["status"] == S.REJECTED and "nonce" in r[2]["va"]["reason"]   # the whole reply
    bad = {e["message"] for e in events if e["kind"] == "evaluate_rejected"}
    assert any("round 1: hungary: evaluation: metrics: 'accuracy' is not a number" in m for m in bad), bad
    assert any("round 1: va: evaluation:" in m and "nonce" in m for m in bad), bad
    round1 = {e["scope"] for e in evals if e["round"] == 1 and e["kind"] == "federated"}
    assert round1 == {"global", "cleveland", "switzerland"}
    assert {e["round"] for e in evals} == {1, 2, 3}


def test_a_registered_node_cannot_answer_as_another_site(tmp_path):
    """With the coordinator's registry (node id -> site id), the name a reply gives
    itself does not count: a node registered as 'hungary' that says 'cleveland' is
    rejected even in round 1, before the real cleveland answered."""
    registry = tmp_path / "sites.json"
    registry.write_text(json.dumps({str(1000 + i): s for i, s in enumerate(HEART)}))
    configs = {1000 + i: {"site-id": s} for i, s in enumerate(HEART)}
    configs[1001] = {"site-id": "cleveland"}     # hungary's machine, started with another's name
    run, rows, events, *_ = _run(tmp_path, lambda cfg: TamperingGrid(cfg, 4, node_configs=configs),
                                 rounds=1, sites_file=str(registry))
    assert run["status"] == "completed"
    r = _by_round(rows)[1]
    assert r["hungary"]["status"] == S.REJECTED
    assert r["hungary"]["reason"] == "reply claims site 'cleveland' but node 1001 is registered as 'hungary'"
    assert all(r[s]["status"] == S.ACCEPTED for s in ("cleveland", "switzerland", "va"))
    assert any(e["kind"] == "evaluate_rejected" and "hungary" in e["message"] for e in events)


# ----------------------------------------------------------------------------- hostile coordinator
def _deployed(tmp_path, policies=None, ledgers=True):
    configs = {}
    for i, s in enumerate(HEART):
        nc = {"site-id": s}
        if ledgers:
            nc["ledger"] = str(tmp_path / f"{s}.ledger.sqlite")
        if policies and s in policies:
            p = tmp_path / f"{s}.policy.toml"
            p.write_text(policies[s])
            nc["policy"] = str(p)
        configs[1000 + i] = nc
    return configs


def test_deployed_sites_refuse_fault_injection(tmp_path):
    configs = _deployed(tmp_path)
    run, rows, events, *_ = _run(tmp_path, lambda cfg: TamperingGrid(cfg, 4, node_configs=configs), rounds=1,
                                 sets=["faults.site=cleveland", "faults.kind=sign", "strategy.min_sites=1"])
    r = _by_round(rows)[1]
    assert {s: row["status"] for s, row in r.items()} == {s: S.REFUSED for s in HEART}
    assert all("fault injection (faults.kind=sign) runs only in simulation" in row["reason"] for row in r.values())
    assert not any(e["kind"].startswith("evaluate_") for e in events)   # sites that refused to train are not evaluated
    assert run["status"] == "failed"                                    # and a run nobody trained in did not complete


def test_fault_injection_still_works_in_simulation(tmp_path):
    run, rows, *_ = _run(tmp_path, lambda cfg: TamperingGrid(cfg, 4), rounds=1,
                         sets=["faults.site=hungary", "faults.kind=shape"])
    r = _by_round(rows)[1]
    assert r["hungary"]["status"] == S.REJECTED and "shape" in r["hungary"]["reason"]


def test_run_config_cannot_choose_a_deployed_sites_paths(tmp_path):
    """cleveland and hungary have a ledger in their node config, switzerland and va none;
    the run config names a data folder and a ledger folder of the coordinator's choice."""
    evil = tmp_path / "coordinator-chosen"
    configs = _deployed(tmp_path)
    for node in (1002, 1003):
        del configs[node]["ledger"]
    run, rows, *_ = _run(tmp_path, lambda cfg: TamperingGrid(cfg, 4, node_configs=configs), rounds=1,
                         sets=[f"site.ledger_dir={evil}", f"data.path={evil / 'data'}", "dp.epsilon=50",
                               "strategy.min_sites=1"])
    r = _by_round(rows)[1]
    # the data the node config names (none: bundled), not the run config's folder
    assert r["cleveland"]["status"] == r["hungary"]["status"] == S.ACCEPTED, r
    assert (tmp_path / "cleveland.ledger.sqlite").exists()
    for s in ("switzerland", "va"):   # no ledger of their own: refused, not written where the run said
        assert r[s]["status"] == S.REFUSED and "privacy ledger" in r[s]["reason"]
    assert not evil.exists()


def test_the_policy_answers_evaluate_too_and_limits_what_it_sends(tmp_path):
    policies = {
        "cleveland": '[code]\nallowed_tasks = ["medical-abstracts"]\n',
        "hungary": "[evaluation]\nsend_group_counts = false\n",
        "switzerland": "[evaluation]\nmin_group_size = 1000\n",
    }
    configs = _deployed(tmp_path, policies)
    run, rows, events, evals, rounds = _run(
        tmp_path, lambda cfg: TamperingGrid(cfg, 4, node_configs=configs), rounds=1)
    r = _by_round(rows)[1]
    assert r["cleveland"]["status"] == S.REFUSED and "allowed_tasks" in r["cleveland"]["reason"]
    # cleveland refused to train, so it is not asked to evaluate (tests/test_evaluation_release.py
    # checks that its policy answers an evaluate message too)
    assert not [e for e in events if e["kind"] == "evaluate_refused"]
    assert "cleveland" not in {e["scope"] for e in evals}
    fairness = rounds[0]["fairness"]
    sites_with_counts = set(fairness["by_site"]["sites"])
    assert "hungary" not in sites_with_counts and "cleveland" not in sites_with_counts
    assert {"switzerland", "va"} <= sites_with_counts
    for attribute, summary in fairness.items():
        if attribute in ("by_site", "excluded_sites"):
            continue
        # switzerland's policy suppresses every group under 1000 patients, the run asked for 5
        assert any("switzerland" in g.get("suppressed_at", []) for g in summary["by_group"].values()), summary["by_group"]


# ----------------------------------------------------------------------------- client-level DP resume
class CrashingGrid(InProcessGrid):
    """The coordinator dies when round ``crash_at``'s training messages go out."""

    def __init__(self, cfg, num_sites, crash_at):
        super().__init__(cfg, num_sites)
        self.crash_at, self.trains = crash_at, 0

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.trains += 1
            if self.trains == self.crash_at:
                raise KeyboardInterrupt("the coordinator is killed")
        return super().push_messages(messages)


def test_client_level_epsilon_counts_the_rounds_released_before_a_resume(tmp_path):
    from fedcare.strategies.client_dp import client_level_epsilon

    cfg = resolve_config("heart-disease", ["train.local_steps=2", "dp.level=client", "dp.noise_multiplier=2.0",
                                           "dp.delta=1e-3", "dp.accountant=rdp"], rounds=3, seed=5)
    cfg.runtime.db = f"sqlite:///{tmp_path}/cdp.db"
    store = Store(cfg.runtime.db)
    cfg.runtime.run_id = store.create_run(cfg.task, cfg.strategy.name, cfg.to_dict(), "test")
    store.close()
    with pytest.raises(KeyboardInterrupt):
        run_federation(CrashingGrid(cfg, 4, crash_at=3), cfg)      # rounds 1 and 2 stored, then killed
    run_federation(InProcessGrid(cfg, 4), cfg)                     # `fedcare server resume`: round 3
    store = Store(cfg.runtime.db)
    try:
        rounds = store.rounds(cfg.runtime.run_id)
        events = [e["kind"] for e in store.events(cfg.runtime.run_id)]
    finally:
        store.close()
    assert [r["round"] for r in rounds] == [1, 2, 3] and "resumed" in events
    fresh = [client_level_epsilon(2.0, n, 1.0, 1e-3, "rdp") for n in (1, 2, 3)]
    assert [r["metrics"]["client_epsilon"] for r in rounds] == pytest.approx(fresh)
