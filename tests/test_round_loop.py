"""The server's round loop pushes messages and pulls replies as they arrive: a late
reply is waited for on a short poll, a site that never answers is recorded as failed
once the timeout passes, and each site's latency lands in the store."""
import time

import pytest

from fedcare.launch import resolve_config
from fedcare.server.federation import run_federation
from fedcare.server.local_grid import InProcessGrid
from fedcare.server.store import Store


class SlowAndSilentGrid(InProcessGrid):
    """The real in-process sites, with one site's reply held back for ``delay`` seconds
    and another's lost on the way (a site whose link went down)."""

    def __init__(self, cfg, n, slow: int, silent: int, delay: float):
        super().__init__(cfg, n)
        self.slow, self.silent, self.delay, self.pulls = slow, silent, delay, 0
        self.held: dict[str, float] = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for mid, m in zip(ids, messages):
            if m.metadata.dst_node_id == self.silent:
                self._replies.pop(mid)
            elif m.metadata.dst_node_id == self.slow:
                self.held[mid] = time.time() + self.delay
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [mid for mid in message_ids if self.held.get(mid, 0) <= time.time()]
        return super().pull_messages(ready)


def test_late_reply_waited_for_silent_site_recorded_and_latency_stored(tmp_path):
    cfg = resolve_config("heart-disease", ["train.local_steps=2", "strategy.min_sites=2",
                                           "strategy.round_timeout=8"], sites=4, rounds=1, seed=3)
    cfg.runtime.db = f"sqlite:///{tmp_path}/loop.db"
    grid = SlowAndSilentGrid(cfg, 4, slow=1001, silent=1002, delay=1.0)
    run_id = run_federation(grid, cfg)
    store = Store(cfg.runtime.db)
    try:
        rows = store.site_rounds(run_id, 1)
        (rnd,) = store.rounds(run_id)
        status = store.get_run(run_id)["status"]
    finally:
        store.close()
    sites = {int(r["node_id"]): r for r in rows}
    assert status == "completed", sites
    assert sites[1000]["accepted"] and sites[1001]["accepted"], {k: (v["reason"], v["metrics"].get("latency_s")) for k, v in sites.items()}
    assert not sites[1002]["accepted"] and "no reply within" in sites[1002]["reason"]
    slow, fast = sites[1001]["metrics"]["latency_s"], sites[1000]["metrics"]["latency_s"]
    assert slow - fast >= 0.8 and slow < fast + 10   # taken when it arrived, not at the timeout
    assert "latency_s" not in sites[1002]["metrics"]
    assert rnd["metrics"]["push_s"] >= 0 and rnd["metrics"]["pull_s"] >= 0
    assert grid.pulls > 3              # polled, not one blocking wait


class CountingGrid(InProcessGrid):
    """The real in-process sites; counts the messages pushed, per message type."""

    def __init__(self, cfg, n):
        super().__init__(cfg, n)
        self.pushed: dict[str, int] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            self.pushed[m.metadata.message_type] = self.pushed.get(m.metadata.message_type, 0) + 1
        return super().push_messages(messages)


def _run_counted(tmp_path, name: str, with_train: bool):
    cfg = resolve_config("heart-disease", ["train.local_steps=3", f"strategy.evaluate_with_train={with_train}"],
                         sites=4, rounds=3, seed=5)
    cfg.runtime.db = f"sqlite:///{tmp_path}/{name}.db"
    grid = CountingGrid(cfg, 4)
    run_id = run_federation(grid, cfg)
    store = Store(cfg.runtime.db)
    try:
        evaluations = {(e["round"], e["scope"], e["kind"]): e["metrics"] for e in store.evaluations(run_id)}
        fairness = {r["round"]: r["fairness"] for r in store.rounds(run_id)}
        status = store.get_run(run_id)["status"]
    finally:
        store.close()
    return status, grid.pushed, evaluations, fairness


def test_evaluation_riding_on_train_gives_the_same_evaluations_with_half_the_messages(tmp_path):
    status, pushed, separate, fair_sep = _run_counted(tmp_path, "separate", False)
    status2, pushed2, riding, fair_ride = _run_counted(tmp_path, "riding", True)
    assert status == status2 == "completed"
    assert pushed == {"train": 12, "evaluate": 12}
    assert pushed2 == {"train": 12, "evaluate": 4}    # the last round's model on its own
    assert {k[0] for k in riding} == {1, 2, 3}         # every round's model evaluated
    assert set(riding) == set(separate)
    for key, metrics in separate.items():             # the same models, the same numbers
        assert riding[key] == pytest.approx(metrics, rel=1e-6), key   # (summed in arrival order)
    assert fair_ride == fair_sep and all(fair_ride.values())
