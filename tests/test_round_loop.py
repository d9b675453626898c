"""The server's round loop pushes messages and pulls replies as they arrive: a late
reply is waited for on a short poll, a site that never answers is recorded as failed
once the timeout passes, and each site's latency lands in the store."""
import time

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
