"""A coordinator in bad faith turns evaluation into a query about one patient: it sends a
model that scores 1 only for the patient whose cholesterol stands out, and reads the
patient's diagnosis from the metrics. Through the real ClientApp handlers (Flower
messages in this process, a site with its own data folder, ledger and policy):
without the release mechanism the attack reads every label; with it, the attacker's
accuracy stays within what the mechanism's epsilon allows, the spend is in the ledger,
and the site refuses small test splits, too many evaluations and unknown models."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from scipy.stats import binom

from fedcare import schemas as S
from fedcare.client.app import app as client_app
from fedcare.client.ledger import SiteLedger
from fedcare.client.release import EVALUATION_RUN, noise_multiplier
from fedcare.launch import resolve_config
from fedcare.models.data import bundled_dir
from fedcare.models.heart_disease import COLUMNS, DROPPED, split_indices
from fedcare.models.state import get_trainable_state
from fedcare.records import to_array_record

CHOL = COLUMNS.index("chol")
KEPT = [i for i, c in enumerate(COLUMNS) if c not in DROPPED]


def _complete_rows() -> list[list[str]]:
    rows = [line.split(",") for line in (bundled_dir("heart-disease") / "processed.cleveland.data")
            .read_text().splitlines() if line.strip()]
    return [r for r in rows if "?" not in [r[i].strip() for i in KEPT]]


ROWS = _complete_rows()
LABELS = np.array([int(float(r[-1]) > 0) for r in ROWS])
TEST = split_indices(LABELS)[1]


def _site_folder(root: Path, target: int, rows: list[list[str]] = ROWS) -> Path:
    """Cleveland's patients with cholesterol at most 350, but the target's at 900."""
    folder = root / f"site-{target}"
    folder.mkdir(parents=True)
    out = []
    for i, r in enumerate(rows):
        r = list(r)
        r[CHOL] = "900" if i == target else str(min(float(r[CHOL]), 350.0))
        out.append(",".join(r))
    (folder / "cleveland.data").write_text("\n".join(out) + "\n")
    return folder


def _cfg(run_id="run-1"):
    cfg = resolve_config("heart-disease", ["train.local_steps=2"], rounds=3, seed=3)
    cfg.runtime.run_id = run_id
    return cfg


def _context(cfg, folder: Path, policy: str | None) -> Context:
    nc = {"site-id": "cleveland", "data-path": str(folder), "ledger": str(folder / "ledger.sqlite"),
          "audit": str(folder / "audit.jsonl")}
    if policy is not None:
        (folder / "policy.toml").write_text(policy)
        nc["policy"] = str(folder / "policy.toml")
    return Context(run_id=1, node_id=1000, state=RecordDict(), run_config=cfg.to_flat(), node_config=nc)


def _crafted_state(cfg, scale=1.0):
    """Logit 40 * (standardised cholesterol - 3.5): positive for the outlier alone."""
    from fedcare.models.registry import get_task

    state = {k: v.copy() for k, v in get_trainable_state(get_task("heart-disease").build_model(cfg)).items()}
    state["weight"][:] = 0.0
    state["weight"][0, 3] = 40.0 * scale     # chol is the 4th encoded feature
    state["bias"][:] = -140.0 * scale
    return state


def _send(ctx, kind: str, state, rnd: int, extra=None) -> Message:
    """The coordinator's message, to the real ClientApp (as server/local_grid.py does)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict({S.ARRAYS: to_array_record(state),
                          S.CONFIG: ConfigRecord({"server-round": rnd, S.NONCE: "n", **(extra or {})})})
    msg = Message(content=content, message_type=kind, dst_node_id=1000, group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = f"{kind}-{rnd}"
    msg.metadata.__dict__["_src_node_id"] = 0
    return client_app(msg, ctx)


def _reply(reply: Message) -> tuple[str, str, dict, dict | None]:
    info = reply.content.config_records[S.SITE]
    if info[S.STATUS] != "ok":
        return info[S.STATUS], info[S.REASON], {}, None
    fairness = json.loads(info[S.FAIRNESS_JSON]) if S.FAIRNESS_JSON in info else None
    return "ok", "", dict(reply.content.metric_records[S.METRICS]), fairness


def _guess(metrics: dict, fairness: dict | None) -> int:
    """The attacker's best reading: the one predicted positive is a true positive if it
    shows up in tp (and the top score bin of the positives) more than in fp."""
    if fairness is not None:
        c = fairness["overall"]["classes"][0]
        return int(c["tp"] - c["fp"] + c["hist_pos"][-1] - c["hist_neg"][-1] > 0)
    return int(metrics["balanced_accuracy"] > 0.5)


def _attack(tmp_path: Path, policy: str | None, targets) -> float:
    cfg = _cfg()
    right = 0
    for t in targets:
        ctx = _context(cfg, _site_folder(tmp_path / ("none" if policy is None else "policy"), t), policy)
        status, reason, metrics, fairness = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))
        assert status == "ok", reason
        right += _guess(metrics, fairness) == LABELS[t]
    return right / len(targets)


def _targets(n=40):
    """n test patients, half with the disease: a prior of 1/2 for the attacker."""
    pos = [i for i in TEST if LABELS[i] == 1][: n // 2]
    neg = [i for i in TEST if LABELS[i] == 0][: n // 2]
    assert len(pos) == len(neg) == n // 2
    return pos + neg


NOISED = "[evaluation]\nevaluation_epsilon = {eps}\nevaluate_only_known_models = false\nmax_evaluations_per_run = 0\n"


def test_crafted_model_attack_reads_every_label_without_the_mechanism(tmp_path):
    targets = _targets(20)
    assert _attack(tmp_path, None, targets) == 1.0     # no policy: today's fairness counts
    exact = ("[evaluation]\nrelease = \"exact\"\nsend_group_counts = false\nmin_group_size = 10\n"
             "evaluate_only_known_models = false\n")
    assert _attack(tmp_path / "exact", exact, targets) == 1.0   # metrics alone: balanced_accuracy


def test_crafted_model_attack_is_bounded_by_the_released_epsilon(tmp_path):
    eps, targets = 0.5, _targets(40)
    accuracy = _attack(tmp_path, NOISED.format(eps=eps), targets)
    bound = math.exp(eps) / (1 + math.exp(eps))                       # randomised response at eps
    slack = binom.ppf(0.999, len(targets), bound) / len(targets)       # 1 in 1000 false alarm
    assert accuracy <= slack, (accuracy, bound, slack)


def test_the_release_is_charged_to_the_site_ledger_before_it_leaves(tmp_path):
    cfg = _cfg()
    ctx = _context(cfg, _site_folder(tmp_path, TEST[0]), NOISED.format(eps=1.0))
    status, _, metrics, fairness = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))
    assert status == "ok"
    assert "loss" not in metrics and set(metrics) >= {"accuracy", "balanced_accuracy", "auroc", S.NUM_EXAMPLES}
    assert fairness["release"]["mechanism"] == "gaussian" and fairness["release"]["epsilon"] == 1.0
    ledger = SiteLedger(Path(ctx.node_config["ledger"]))
    [spend] = ledger.entries(run_id=EVALUATION_RUN.format(run_id="run-1"))
    assert spend.sample_rate == 1.0 and spend.steps == 1
    assert spend.noise_multiplier == pytest.approx(noise_multiplier(1.0, 1e-5))
    assert ledger.epsilon(spend.dataset_id, 1e-5, "rdp") == pytest.approx(1.0, rel=1e-2)


def test_min_cell_size_applies_to_the_overall_cell(tmp_path):
    cfg = _cfg()
    ctx = _context(cfg, _site_folder(tmp_path, 0, rows=ROWS[:24]), "[evaluation]\nevaluate_only_known_models = false\n")
    status, reason, *_ = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))   # 24 rows: 9 to test
    assert status == "refused" and "min_cell_size=10" in reason
    entries = [json.loads(line) for line in Path(ctx.node_config["audit"]).read_text().splitlines()]
    assert entries[-1]["decision"] == "refused" and entries[-1]["kind"] == "evaluate"
    assert not SiteLedger(Path(ctx.node_config["ledger"])).entries()    # nothing charged, nothing sent


def test_evaluations_per_run_and_their_epsilon_are_capped(tmp_path):
    cfg = _cfg()
    folder = _site_folder(tmp_path, TEST[0])
    ctx = _context(cfg, folder, "[evaluation]\nevaluate_only_known_models = false\nmax_evaluations_per_run = 2\n")
    results = [_reply(_send(ctx, "evaluate", _crafted_state(cfg, 1 + k), 1 + k)) for k in range(3)]
    assert [r[0] for r in results] == ["ok", "ok", "refused"]
    assert "max_evaluations_per_run=2" in results[2][1]
    # the epsilon cap binds too: 1.0 per evaluation, at most 1.2 per run (two compose to about 1.45)
    ctx = _context(_cfg("run-2"), folder, "[evaluation]\nevaluate_only_known_models = false\n"
                                          "max_evaluation_epsilon_per_run = 1.2\n")
    results = [_reply(_send(ctx, "evaluate", _crafted_state(cfg), 1 + k)) for k in range(2)]
    assert [r[0] for r in results] == ["ok", "refused"] and "max_evaluation_epsilon_per_run=1.2" in results[1][1]


def test_a_site_evaluates_only_models_it_knows(tmp_path):
    cfg = _cfg()
    ctx = _context(cfg, _site_folder(tmp_path, TEST[0]), "")    # a policy file with the defaults
    crafted, initial = _crafted_state(cfg), _crafted_state(cfg, 0.0)
    status, reason, *_ = _reply(_send(ctx, "evaluate", crafted, 1))
    assert status == "refused" and "evaluate_only_known_models" in reason    # no round trained
    train = _send(ctx, "train", initial, 1)
    assert train.content.config_records[S.SITE][S.STATUS] == "ok"
    assert _reply(_send(ctx, "evaluate", crafted, 1))[0] == "ok"          # round 1's aggregate, once
    assert _reply(_send(ctx, "evaluate", crafted, 1))[0] == "refused"     # not twice
    assert _reply(_send(ctx, "evaluate", initial, 1))[0] == "ok"          # a model it was sent to train
    # a riding evaluation of a model sent for training is answered, and training goes on
    reply = _send(ctx, "train", crafted, 2, {S.EVALUATE_FIRST: True})
    assert reply.content.config_records[S.SITE][S.STATUS] == "ok"
    assert S.METRICS_JSON in reply.content.config_records[S.EVALUATION]


def test_an_exact_release_still_keeps_the_policys_caps_and_minimum_cell(tmp_path):
    cfg = _cfg()
    ctx = _context(cfg, _site_folder(tmp_path, 0, rows=ROWS[:24]), "[evaluation]\nrelease = \"exact\"\n")
    status, reason, *_ = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))
    assert status == "refused" and "evaluate_only_known_models" in reason
    ctx = _context(_cfg("run-2"), tmp_path / "site-0", "[evaluation]\nrelease = \"exact\"\n"
                                                      "evaluate_only_known_models = false\n")
    status, reason, *_ = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))
    assert status == "refused" and "min_cell_size=10" in reason


def test_a_simulated_site_without_a_policy_releases_what_it_did(tmp_path):
    cfg = _cfg()
    ctx = _context(cfg, _site_folder(tmp_path, TEST[0]), None)
    status, _, metrics, fairness = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))
    assert status == "ok" and "loss" in metrics and "release" not in fairness
    assert metrics[S.NUM_EXAMPLES] == len(TEST)


def test_planted_bug_last_evaluation_is_refused_with_an_audit_entry(tmp_path):
    """A deployed site refuses audit.planted_bug; its last evaluation used to crash."""
    cfg = resolve_config("heart-disease", ["train.local_steps=2", "audit.planted_bug=no_noise"], rounds=1, seed=3)
    cfg.runtime.run_id = "run-bug"
    ctx = _context(cfg, _site_folder(tmp_path, TEST[0]), None)
    status, reason, *_ = _reply(_send(ctx, "evaluate", _crafted_state(cfg), 1))
    assert status == "refused" and "planted_bug" in reason
    [entry] = [json.loads(line) for line in Path(ctx.node_config["audit"]).read_text().splitlines()]
    assert (entry["kind"], entry["decision"], entry["round"]) == ("evaluate", "refused", 1)


def test_a_round_loop_with_one_noised_site_evaluates_it_and_weights_the_global_metrics(tmp_path):
    """Through the real round loop: va (a policy file, evaluation epsilon 8) trains, then
    evaluates the round's aggregate under the mechanism; the global loss is the mean
    over the sites that send one, not diluted by va's examples."""
    from fedcare.server.federation import run_federation
    from fedcare.server.local_grid import InProcessGrid
    from fedcare.server.store import Store

    cfg = resolve_config("heart-disease", ["train.local_steps=2"], rounds=1, seed=3)
    cfg.runtime.db = f"sqlite:///{tmp_path}/loop.db"
    store = Store(cfg.runtime.db)
    cfg.runtime.run_id = store.create_run(cfg.task, cfg.strategy.name, cfg.to_dict(), "test")
    store.close()
    configs = []
    for site in ("cleveland", "hungary", "switzerland", "va"):
        nc = {"site-id": site, "ledger": str(tmp_path / f"{site}.ledger.sqlite")}
        if site == "va":
            # epsilon 8: the noised total of va's 45 test patients stays positive (at the default
            # epsilon 1 its noise sd is ~30 counts, and a non-positive total releases no metric)
            (tmp_path / "va.policy.toml").write_text(
                "[evaluation]\nmin_cell_size = 5\nevaluation_epsilon = 8.0\n"
                "max_evaluation_epsilon_per_run = 10.0\n")
            nc["policy"] = str(tmp_path / "va.policy.toml")
        configs.append(nc)
    run_id = run_federation(InProcessGrid(cfg, 4, node_configs=configs), cfg)
    store = Store(cfg.runtime.db)
    try:
        assert store.get_run(run_id)["status"] == "completed"
        evals = {e["scope"]: e for e in store.evaluations(run_id) if e["kind"] == "federated"}
    finally:
        store.close()
    assert "loss" not in evals["va"]["metrics"] and "accuracy" in evals["va"]["metrics"]
    exact = [evals[s] for s in ("cleveland", "hungary", "switzerland")]
    loss = sum(e["metrics"]["loss"] * e["num_examples"] for e in exact) / sum(e["num_examples"] for e in exact)
    assert evals["global"]["metrics"]["loss"] == pytest.approx(loss)
    spends = SiteLedger(tmp_path / "va.ledger.sqlite").entries(run_id=EVALUATION_RUN.format(run_id=run_id))
    assert [(s.round, s.steps) for s in spends] == [(1, 1)]
