"""The site's error boundary: whatever is wrong with a hospital's folder, the reason that
leaves the site says the kind of problem, the file (relative), the line and the column,
never a value of the data, an exception's text or an absolute path. The full detail
stays in the site's own audit log, with the sha256 of what was sent.

Each bad folder plants a distinctive token in its bad record; deployed-style sites
(node config ``site-id``, ``data-path``, ``audit``) run through the real ServerApp round
loop and ClientApp handlers (tests/test_trust_boundary.py's grid), and everything the
coordinator holds afterwards (the SQL store's file, events, replies, its logs) is searched."""
import hashlib
import json
import logging

import pandas as pd
import pytest

from fedcare import schemas as S
from fedcare.client.audit import AuditLog
from fedcare.errors import KINDS, DataError, SiteProblem, public_reason
from fedcare.launch import resolve_config
from fedcare.server.federation import run_federation
from fedcare.server.store import Store

from sitefolders import breast_arrays, write_dicom, write_toml
from test_trust_boundary import TamperingGrid

TOKEN = "ZQXJ-PLANTED-7731"
TABULAR = ["data.labels=no,yes", "data.features=age,sex=f|m"]


def _tabular(folder, rows, toml_extra="", fmt="csv", name="records.csv"):
    write_toml(folder, f'dataset_id = "{folder.name}"\nfamily = "tabular"\nformat = "{fmt}"\n'
                       f'files = ["{name}"]\n{toml_extra}')
    (folder / name).write_text(rows)
    return folder


GOOD = "age,sex,label\n" + "".join(f"{40 + i},{'fm'[i % 2]},{('no', 'yes')[i % 3 == 0]}\n" for i in range(30))


def tabular_sites(root):
    lines = GOOD.splitlines(keepends=True)
    return {
        "good": _tabular(root / "good", GOOD),
        "csv-parse": _tabular(root / "csv-parse", "".join(lines[:5]) + f"41,f,no,{TOKEN}\n" + "".join(lines[5:])),
        "bad-value": _tabular(root / "bad-value", "".join(lines[:3]) + f"{TOKEN},f,no\n" + "".join(lines[3:])),
        "bad-label": _tabular(root / "bad-label", "".join(lines[:3]) + f"44,m,{TOKEN}\n" + "".join(lines[3:])),
        "bad-level": _tabular(root / "bad-level", "".join(lines[:3]) + f"44,{TOKEN},no\n" + "".join(lines[3:])),
        "bad-json": _tabular(root / "bad-json", "".join(json.dumps({"age": 40 + i, "sex": "f", "label": "no"}) + "\n"
                                                        for i in range(4)) + f'{{"age": 1, "sex": "{TOKEN}\n',
                             fmt="jsonl", name="records.jsonl"),
        "description": _tabular(root / "description", GOOD, f'colour = "{TOKEN}"\n'),
        "unknown-key": _tabular(root / "unknown-key", GOOD, f'{TOKEN} = 1\n'),
        "duplicate-id": _tabular(root / "duplicate-id", "id,age,sex,label\n" + f"{TOKEN},40,f,no\n{TOKEN},41,m,yes\n",
                                 '[columns]\nid = "id"\n'),
    }


def text_sites(root):
    empty = write_toml(root / "empty-text", 'dataset_id = "e"\nfamily = "text"\nformat = "csv"\nfiles = ["t.csv"]\n'
                                            '[columns]\nid = "note"\n')
    pd.DataFrame({"note": ["n1", TOKEN, "n3"], "text": ["chest pain", "", "fever"],
                  "label": ["a", "b", "a"]}).to_csv(empty / "t.csv", index=False)
    bad = write_toml(root / "bad-json-text", 'dataset_id = "j"\nfamily = "text"\nformat = "jsonl"\n'
                                             'files = ["n.jsonl"]\n')
    (bad / "n.jsonl").write_text('{"text": "ok", "label": "a"}\n' + '{"text": "' + TOKEN + ' oops", "label": \n')
    return {"empty-text": empty, "bad-json-text": bad}


def image_sites(root):
    from PIL import Image

    images, _ = breast_arrays(8)
    png = write_toml(root / "bad-image", 'dataset_id = "p"\nfamily = "image"\nformat = "png"\n')
    for i, img in enumerate(images):
        d = png / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        Image.fromarray(img).save(d / f"x{i}.png")
    victim = png / "a" / "x1.png"
    data = victim.read_bytes()
    victim.write_bytes(data[:40] + TOKEN.encode() * 3)        # a readable header, then garbage
    dcm = write_toml(root / "bad-dicom", 'dataset_id = "d"\nfamily = "image"\nformat = "dicom"\n'
                                         'files = ["labels.csv"]\n')
    (dcm / "dicom").mkdir()
    rows = []
    for i, img in enumerate(images):
        name = f"dicom/{i}.dcm"
        write_dicom(dcm / name, img, TOKEN if i == 3 else f"P{i}")
        rows.append({"file": name, "label": "ab"[i % 2]})
    broken = dcm / "dicom" / "3.dcm"
    broken.write_bytes(broken.read_bytes()[:-400])             # pixel data cut short
    pd.DataFrame(rows).to_csv(dcm / "labels.csv", index=False)
    return {"bad-image": png, "bad-dicom": dcm}


def _federate(tmp_path, task, sets, folders, grid_log):
    cfg = resolve_config(task, ["train.local_steps=1", "strategy.min_sites=1", *sets], rounds=1, seed=3)
    cfg.runtime.db = f"sqlite:///{tmp_path}/{task}.db"
    names = list(folders)
    configs = {1000 + i: {"site-id": n, "data-path": str(folders[n]), "audit": str(tmp_path / f"{n}.audit.jsonl")}
               for i, n in enumerate(names)}

    def keep(rnd, kind, node, reply, history):
        grid_log.append(json.dumps({k: dict(v.items()) for k, v in reply.content.items()
                                    if k in (S.SITE, S.EVALUATION)}, default=str) if not reply.has_error()
                        else reply.error.reason)
        return reply

    run_id = run_federation(TamperingGrid(cfg, len(names), keep, node_configs=configs), cfg)
    store = Store(cfg.runtime.db)
    try:
        held = {"run": store.get_run(run_id), "rows": store.site_rounds(run_id), "events": store.events(run_id)}
    finally:
        store.close()
    return held, (tmp_path / f"{task}.db").read_bytes()


@pytest.mark.e2e
def test_a_planted_token_in_any_bad_record_never_reaches_the_coordinator(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    runs = [("tabular", TABULAR, tabular_sites(tmp_path / "tab")),
            ("text", ["data.labels=a,b"], text_sites(tmp_path / "txt")),
            ("image", ["data.labels=a,b", "data.image_size=32"], image_sites(tmp_path / "img"))]
    refused = {}
    for task, sets, folders in runs:
        replies: list[str] = []
        held, db = _federate(tmp_path, task, sets, folders, replies)
        assert TOKEN.encode() not in db, task                       # the store's whole file
        text = json.dumps(held, default=str) + "\n".join(replies)
        assert TOKEN not in text, [line for line in text.splitlines() if TOKEN in line]
        assert str(tmp_path) not in text                            # no absolute path of a site
        for row in held["rows"]:
            if row["site"] in folders and row["site"] != "good":
                refused[row["site"]] = row
    coordinator_logs = [r.getMessage() for r in caplog.records if not r.name.startswith("fedcare.client")]
    assert not [m for m in coordinator_logs if TOKEN in m]

    expected = {"csv-parse": "unreadable-table", "bad-value": "bad-value", "bad-label": "unknown-label",
                "bad-level": "bad-value", "bad-json": "bad-json", "description": "description",
                "unknown-key": "description", "duplicate-id": "duplicate", "empty-text": "empty-value",
                "bad-json-text": "bad-json", "bad-image": "bad-image", "bad-dicom": "bad-dicom"}
    assert set(refused) == set(expected)
    for site, kind in expected.items():
        row = refused[site]
        assert row["status"] == S.REFUSED and row["reason"].startswith(f"site refused ({kind})"), (site, row)
        # the site kept the detail, and the hash of exactly what it sent
        (entry,) = [e for e in AuditLog(tmp_path / f"{site}.audit.jsonl").entries() if e["decision"] == "refused"]
        assert entry["payload_sha256"] == hashlib.sha256(row["reason"].encode()).hexdigest()
        assert entry["bytes"] == len(row["reason"].encode()) and entry["reason"]
    # where the problem is, as the site's staff would look for it
    assert "records.csv line 4, column age" in refused["bad-value"]["reason"]
    assert "records.csv line 4, column label" in refused["bad-label"]["reason"]
    assert "records.jsonl" in refused["bad-json"]["reason"]
    assert "t.csv line 3, column text" in refused["empty-text"]["reason"]
    assert "a/x1.png" in refused["bad-image"]["reason"] and "dicom/3.dcm" in refused["bad-dicom"]["reason"]
    assert "key colour" in refused["description"]["reason"]
    # the detail the site kept names the value (so the test above could fail)
    for site in ("bad-value", "bad-label", "csv-parse", "description"):
        audit = json.dumps(list(AuditLog(tmp_path / f"{site}.audit.jsonl").entries()))
        assert TOKEN in audit, site


def test_a_policy_or_privacy_refusal_keeps_its_words_but_no_path():
    from fedcare.errors import PolicyRefusal, PrivacyError

    assert public_reason(PrivacyError("cannot open privacy ledger /srv/h/ledger.db: locked\nmore")) == \
        "cannot open privacy ledger (path withheld): locked"
    assert public_reason(PolicyRefusal("site policy refuses the run: dp.epsilon 8 / 10 > 1/N")) == \
        "site policy refuses the run: dp.epsilon 8 / 10 > 1/N"


def test_a_problem_survives_pickling_as_a_dataloader_worker_sends_it():
    import pickle

    err = pickle.loads(pickle.dumps(DataError("detail", problem=SiteProblem("bad-image", "a/x.png"))))
    assert type(err) is DataError and str(err) == "detail" and err.problem == SiteProblem("bad-image", "a/x.png")


def test_an_unexpected_error_at_a_site_leaves_as_a_fixed_sentence():
    assert public_reason(KeyError(f"{TOKEN} /home/site/data.csv")) == SiteProblem("internal").text()
    assert public_reason(DataError(f"{TOKEN}")) == SiteProblem("data").text()
    outside = SiteProblem("bad-value", f"../{TOKEN}.csv", 3, "/etc/passwd").text()
    assert TOKEN not in outside and "/etc" not in outside and outside.count("(name withheld)") == 2
    assert all(public_reason(DataError("x", problem=SiteProblem(k))).startswith(f"site refused ({k})") for k in KINDS)


def test_a_handler_that_raises_replies_with_a_refusal_and_audits_it(tmp_path, identity):
    """A message without the global model makes the train handler raise: the reply is a
    refusal with the fixed sentence, the site's audit log has the exception."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedcare.client.app import app as client_app

    folder = _tabular(tmp_path / "site", GOOD)
    cfg = resolve_config("tabular", TABULAR, rounds=1, seed=3)
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config=cfg.to_flat(),
                  node_config={"site-id": "h", "data-path": str(folder), "audit": str(tmp_path / "a.jsonl")})
    msg = Message(RecordDict({S.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = client_app(msg, ctx)
    assert not reply.has_error()
    info = reply.content[S.SITE]
    assert info[S.STATUS] == "refused" and info[S.REASON] == SiteProblem("internal").text()
    (entry,) = AuditLog(tmp_path / "a.jsonl").entries()
    assert entry["decision"] == "refused" and "KeyError" in entry["reason"]
    assert entry["payload_sha256"] == hashlib.sha256(info[S.REASON].encode()).hexdigest()
