"""The round loop: configure, send, screen, aggregate, evaluate, store.

Every round is written to the store in one transaction after it completes, so a crash
loses at most the round in flight, and ``fedcare server resume`` continues from the
last committed round with the stored global state.
"""
from __future__ import annotations

import logging
import random
import secrets
import time

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcare import __version__, schemas as S
from fedcare.config import RunConfig
from fedcare.models.registry import get_task
from fedcare.models.state import get_trainable_state
from fedcare.records import to_array_record
from fedcare.strategies.aggregate import ServerState, aggregate
from fedcare.strategies.client_dp import restore_releases
from fedcare.strategies.registry import build_strategy

log = logging.getLogger("fedcare.server")
POLL_S = 0.1   # between pulls of the replies still missing


def initial_state(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The global trainable state before round 1: the task's model built with the run's
    seed, exactly as every site builds it."""
    return get_trainable_state(get_task(cfg.task).build_model(cfg))


def run_federation(grid: Grid, cfg: RunConfig) -> str:
    from .store import Store, default_db_url

    store = Store(cfg.runtime.db or default_db_url())
    run_id = cfg.runtime.run_id or store.create_run(cfg.task, cfg.strategy.name, cfg.to_dict(), __version__)
    try:
        Federation(grid, cfg, store, run_id).run()
    except BaseException as err:
        store.set_status(run_id, "failed", f"{type(err).__name__}: {err}")
        store.add_event(run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        store.close()
    return run_id


class Federation:
    def __init__(self, grid: Grid, cfg: RunConfig, store, run_id: str) -> None:
        self.grid, self.cfg, self.store, self.run_id = grid, cfg, store, run_id
        self.node_ranks: dict[int, int] = {}
        self.node_sites: dict[int, str] = {}   # learnt from replies, to name a site that drops out
        from .replies import Identities

        self.identities = Identities.from_file(cfg.runtime.sites_file)
        self.latency: dict[int, float] = {}     # node -> seconds from push to reply, last exchange
        self.transfer: dict[str, float] = {}    # seconds pushing / pulling, last exchange
        self.accepted_updates = 0               # over the rounds this process ran
        self.task = get_task(cfg.task)
        self.strategy = build_strategy(cfg, self.task)   # the rule, its LoRA space, client-level DP
        self.server_state = ServerState()                 # what aggregation carries between rounds

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        cfg, store = self.cfg, self.store
        start = store.last_round(self.run_id) + 1
        if start > 1:
            state = store.load_global_state(self.run_id)
            for row in store.site_rounds(self.run_id):   # who was who, before the restart
                if row.get("node_id") and not str(row["site"]).startswith("node-"):
                    self.node_sites[int(row["node_id"])] = row["site"]
            # client-level DP releases count again; FedAdam/FedYogi moments start afresh
            self.server_state = restore_releases(self.server_state, store.rounds(self.run_id))
            store.add_event(self.run_id, "resumed", f"resuming at round {start} of {cfg.rounds}")
        else:
            state = initial_state(cfg)
            store.add_event(self.run_id, "started", f"{cfg.rounds} rounds of {cfg.strategy.name} on {cfg.task}")
        store.set_status(self.run_id, "running")
        self.expected = {k: (v.shape, str(v.dtype)) for k, v in self._shared(state).items()}
        for rnd in range(start, cfg.rounds + 1):
            state = self.round(rnd, state)
        if start <= cfg.rounds and not self.accepted_updates:   # nothing was trained: not a completed run
            msg = f"no site sent an accepted update in rounds {start}-{cfg.rounds} (every site refused or failed)"
            store.set_status(self.run_id, "failed", msg)
            store.add_event(self.run_id, "failed", msg)
            return
        store.set_status(self.run_id, "completed")
        store.add_event(self.run_id, "completed", f"{cfg.rounds} rounds")

    def round(self, rnd: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.time()
        self._wait_for_sites()
        cfg = self.cfg
        timeout = cfg.strategy.round_timeout
        shared = self._shared(state)
        nonce = secrets.token_hex(16)   # echoed by every site: a reply from an earlier round is stale
        rides = cfg.strategy.evaluate_with_train and rnd > 1   # the sites evaluate round rnd-1's model
        config = ConfigRecord({S.NONCE: nonce, **({S.EVALUATE_FIRST: True} if rides else {})})
        for key, value in self.strategy.train_config.items():   # fedprox: proximal-mu
            config[key] = value
        msgs = self._messages(MessageType.TRAIN, rnd, shared, config, cfg.strategy.fraction_train)
        self._fit_ranks(msgs, shared)
        replies = self._send_and_collect(msgs, timeout)
        if rides:
            self._store_evaluations(rnd - 1, replies, nonce)
        parsed = self._parse(msgs, replies, "train", nonce, shared)
        placement = {u.site: u.worker for u in parsed if u.worker}   # simulation: where each site ran
        sites, accepted = self._screen(parsed, shared)
        for s in sites:   # seconds from the push to the reply's arrival, per site
            if s.node_id in self.latency:
                s.metrics["latency_s"] = self.latency[s.node_id]
        metrics: dict[str, float] = {"sites_accepted": float(len(accepted)), **self.transfer}
        if placement:
            metrics["worker_nodes"] = float(len({w.rsplit("/", 2)[-2] for w in placement.values()}))
        self.accepted_updates += len(accepted)
        if len(accepted) >= cfg.strategy.min_sites:
            new, agg_metrics = self._aggregate(rnd, accepted, sites, shared, nonce)
            if new is not None:
                state = {**state, **new}
            sent = [s.update_bytes for s in sites if s.accepted]
            metrics["update_bytes_total"] = float(sum(sent))
            metrics["update_bytes_per_site"] = float(np.mean(sent)) if sent else 0.0
            metrics.update({k: float(v) for k, v in (agg_metrics or {}).items()})   # train_loss, diagnostics
            metrics["aggregated"] = 1.0
        else:
            metrics["aggregated"] = 0.0
            self.store.add_event(self.run_id, "round_skipped",
                                 f"round {rnd}: {len(accepted)} accepted updates < strategy.min_sites={cfg.strategy.min_sites}; global model unchanged")
        evaluations, fairness = [], None
        if not cfg.strategy.evaluate_with_train or rnd == cfg.rounds:   # else: in the next round's messages
            evaluations, fairness = self._evaluate(rnd, state, {s.node_id for s in sites if s.status == S.REFUSED})
        record = S.RoundRecord(round=rnd, started_at=t0, ended_at=time.time(), metrics=metrics, sites=sites,
                               evaluations=evaluations, global_state=state, fairness=fairness)
        self.store.write_round(self.run_id, record)
        if placement:
            self.store.add_event(self.run_id, "placement", f"round {rnd}: {len(placement)} sites ran on "
                                 f"{metrics['worker_nodes']:.0f} Ray node(s)", placement)
        for s in sites:
            if s.status == S.REFUSED:
                self.store.add_event(self.run_id, "site_refused", f"round {rnd}: {s.site} refused: {s.reason}")
            elif s.status == S.REJECTED:
                self.store.add_event(self.run_id, "site_rejected", f"round {rnd}: {s.site}: {s.reason}")
        log.info("round %d/%d stored: %s", rnd, cfg.rounds, {k: round(v, 4) for k, v in metrics.items()})
        return state

    # -------------------------------------------------------------- helpers
    def _send_and_collect(self, msgs: list[Message], timeout: float) -> list[Message]:
        """Push ``msgs`` and pull replies as they arrive (a short poll instead of
        ``Grid.send_and_receive``'s 3 s one) until all are in or ``timeout`` has passed
        since the push.
        Records each site's latency (push to arrival) in ``self.latency`` and the time
        spent pushing and pulling in ``self.transfer``."""
        t0 = time.time()
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(self.grid.push_messages(msgs), msgs) if mid}
        pushed = time.time()
        self.latency = {}
        self.transfer = {"push_s": pushed - t0, "pull_s": 0.0}
        replies: list[Message] = []
        while pending:   # at least one pull, however long the push took
            p0 = time.time()
            got = list(self.grid.pull_messages(list(pending)))
            if got:
                self.transfer["pull_s"] += time.time() - p0
            for r in got:
                node = pending.pop(r.metadata.reply_to_message_id, None)
                if node is not None:
                    self.latency[node] = time.time() - t0
                    replies.append(r)
            if not pending or time.time() - pushed >= timeout:   # timed from the push, as flwr does
                break
            if not got:
                time.sleep(POLL_S)
        return replies

    def _aggregate(self, rnd: int, accepted: list[S.SiteUpdate], sites: list[S.SiteRound],
                   shared: dict[str, np.ndarray], nonce: str):
        """(new state, the round's aggregation metrics: train_loss weighted as the state,
        diagnostics) by the strategy, or by secure aggregation (server/secagg.py)."""
        if not self.cfg.secagg.enabled:
            result = aggregate(self.strategy, accepted, shared, rnd, self.server_state)
            self.server_state = result.server_state
            loss = {} if result.train_loss is None else {S.TRAIN_LOSS: result.train_loss}
            return result.state, {**loss, **result.diagnostics}
        from .secagg import secure_aggregate

        return secure_aggregate(self, rnd, accepted, sites, shared, nonce)   # secagg_* numbers in its metrics

    def _messages(self, kind: str, rnd: int, arrays: dict[str, np.ndarray], config: ConfigRecord,
                  fraction: float) -> list[Message]:
        """One ``kind`` message per site, in node order, all carrying ``arrays`` and
        ``config`` with the round number: every connected site, or a random ``fraction``
        of them (at least ``strategy.min_sites``), drawn from the run's seed, the round and
        ``kind``: a repeated or resumed run samples the same sites."""
        nodes = sorted(self.grid.get_node_ids())
        size = max(int(len(nodes) * fraction), self.cfg.strategy.min_sites)
        if size < len(nodes):
            nodes = sorted(random.Random(f"{self.cfg.seed}/{rnd}/{kind}").sample(nodes, size))
        config[S.SERVER_ROUND] = rnd
        content = RecordDict({S.ARRAYS: to_array_record(arrays), S.CONFIG: config})
        return [Message(content=content, message_type=kind, dst_node_id=node) for node in nodes]

    def _fit_ranks(self, msgs: list[Message], shared: dict[str, np.ndarray]) -> None:
        """Send each site whose LoRA rank is known (from its earlier replies) the global
        state at its own rank; the others get the global rank and fit it themselves."""
        from fedcare.strategies.hetero import per_site_arrays

        for m in msgs:
            rank = self.node_ranks.get(m.metadata.dst_node_id)
            if rank:  # a RecordDict of its own: _messages shares one across messages
                records = dict(m.content.items())
                records[S.ARRAYS] = to_array_record(per_site_arrays(self.strategy.lora, shared, rank))
                m.content = RecordDict(records)

    def _shared(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.cfg.lora.personalize and self.cfg.personalize.method != "personal_head":
            return state
        from fedcare.strategies.personal import personal_split

        shared, _ = personal_split(state, self.cfg)
        return {k: state[k] for k in shared}

    def _site_name(self, node: int) -> str:
        return self.identities.name(node) or self.node_sites.get(node, f"node-{node}")

    def _wait_for_sites(self) -> None:
        need = self.cfg.strategy.min_sites
        deadline = time.time() + self.cfg.strategy.round_timeout
        while len(list(self.grid.get_node_ids())) < need:
            if time.time() > deadline:
                raise TimeoutError(f"fewer than strategy.min_sites={need} sites connected")
            time.sleep(1.0)

    def _parse(self, sent: list[Message], replies: list[Message], kind: str, nonce: str,
               shared: dict[str, np.ndarray] | None = None) -> list[S.SiteUpdate]:
        """One ``SiteUpdate`` per message sent: its reply decoded, or why there is none."""
        from .replies import parse_reply

        expected = {k: (v.shape, str(v.dtype)) for k, v in (shared or {}).items()}
        hetero = self.task.uses_lora and self.cfg.lora.aggregation != "ffa"
        if kind == "train" and self.cfg.secagg.enabled:
            kind = "keys"   # a train reply carries public keys, no arrays (server/secagg.py)
        by_node = {m.metadata.src_node_id: m for m in replies}
        updates = []
        for m in sent:
            node = m.metadata.dst_node_id
            reply = by_node.get(node)
            if reply is None:
                updates.append(S.SiteUpdate(node_id=node, site=self._site_name(node), status=S.FAILED,
                                            reason=f"no reply within {self.cfg.strategy.round_timeout:.0f} s"))
                continue
            update = parse_reply(reply, kind, self.identities, nonce, expected, allow_lower_rank=hetero)
            if not update.site.startswith("node-"):
                self.node_sites[node] = update.site
            updates.append(update)
        return updates

    def _screen(self, updates: list[S.SiteUpdate], shared: dict[str, np.ndarray]):
        """Per-site outcome of a training round; only accepted replies are aggregated."""
        from fedcare.strategies.screening import screen_updates

        if self.cfg.secagg.enabled:   # no update to screen: each site's clipping bounds it
            return [u.site_round() for u in updates], [u for u in updates if u.ok]
        ok = [u for u in updates if u.ok]
        for u in ok:
            if u.lora_rank:
                self.node_ranks[u.node_id] = u.lora_rank
        expected = {k: (v.shape, str(v.dtype)) for k, v in shared.items()}
        hetero = self.task.uses_lora and self.cfg.lora.aggregation != "ffa"
        accepted, rejected = screen_updates(expected, [(u.site, u.arrays, u.num_examples) for u in ok],
                                            self.cfg.strategy.screen_norm_factor,
                                            global_state=shared, allow_lower_rank=hetero)
        sites = [u.site_round() for u in updates]
        for row in sites:
            if row.status == S.ACCEPTED and row.site in rejected:
                row.status, row.reason = S.REJECTED, rejected[row.site]
        update_of = {u.site: u for u in ok}
        return sites, [update_of[s] for s in accepted]

    def _evaluate(self, rnd: int, state: dict[str, np.ndarray], refused: set[int] = frozenset()):
        """Round ``rnd``'s global model evaluated by the sites, in evaluate messages; a
        site that refused to train in the round is not asked (``refused``: its nodes)."""
        nonce = secrets.token_hex(16)
        msgs = [m for m in self._messages(MessageType.EVALUATE, rnd, self._shared(state), ConfigRecord({S.NONCE: nonce}),
                                          self.cfg.strategy.fraction_evaluate)
                if m.metadata.dst_node_id not in refused]
        replies = self._send_and_collect(msgs, self.cfg.strategy.round_timeout)
        return self._summarise(rnd, self._parse(msgs, replies, "evaluate", nonce))

    def _store_evaluations(self, rnd: int, replies: list[Message], nonce: str) -> None:
        """Round ``rnd``'s global model as evaluated in the train replies of the next
        round, added to the stored round ``rnd``."""
        from .replies import parse_evaluation

        updates = [u for u in (parse_evaluation(r, self.identities, nonce) for r in replies) if u is not None]
        evaluations, fairness = self._summarise(rnd, updates)
        if evaluations:
            self.store.add_evaluations(self.run_id, rnd, evaluations, fairness)

    def _summarise(self, rnd: int, updates: list[S.SiteUpdate]):
        """Per-site and global evaluations, and the fairness counts summed over sites."""
        from fedcare.models.fairness import aggregate

        evaluations: list[S.Evaluation] = []
        counts: dict[str, dict] = {}
        totals: dict[str, float] = {}
        weights: dict[str, int] = {}   # examples behind each metric: a noised release sends no loss
        n_total = 0
        for u in updates:
            if not u.ok:   # refused, failed or rejected: recorded, never silently dropped
                self.store.add_event(self.run_id, f"evaluate_{u.status}", f"round {rnd}: {u.site}: {u.reason}")
                continue
            m = dict(u.metrics)
            n = int(m.pop(S.NUM_EXAMPLES, 0))
            evaluations.append(S.Evaluation(scope=u.site, metrics=m, num_examples=n))
            if u.local_metrics is not None:
                evaluations.append(S.Evaluation(scope=u.site, metrics=u.local_metrics, num_examples=n, kind="local"))
            for model, numbers in (u.benefit or {}).items():   # the benefit of joining, at this site
                evaluations.append(S.Evaluation(scope=u.site, metrics=numbers, num_examples=n,
                                                kind=S.benefit_kind(model)))
            if u.fairness is not None:
                counts[u.site] = u.fairness
            if u.audit is not None:   # the site's privacy-audit bound (client/privacy_audit.py)
                evaluations.append(S.Evaluation(scope=u.site, metrics=u.audit, num_examples=0, kind=S.AUDIT))
            n_total += n
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * n
                weights[k] = weights.get(k, 0) + n
        if n_total:
            glob = {k: v / weights[k] for k, v in totals.items() if weights[k]}
            per_site_acc = [e.metrics.get("accuracy") for e in evaluations if e.kind == "federated"]
            per_site_acc = [a for a in per_site_acc if a is not None]
            if per_site_acc:
                glob["mean_site_accuracy"] = float(np.mean(per_site_acc))
                glob["worst_site_accuracy"] = float(np.min(per_site_acc))
            evaluations.insert(0, S.Evaluation(scope="global", metrics=glob, num_examples=n_total))
        fairness = aggregate(counts) if counts else None
        return evaluations, fairness
