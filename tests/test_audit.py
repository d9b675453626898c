"""The site audit log: appends chain, and edits, deletions, reordering and truncation show."""
import json
import multiprocessing as mp

import pytest

from fedcare.client.audit import AuditLog
from fedcare.errors import FedcareError


def fill(path, n=5):
    log = AuditLog(path)
    for i in range(n):
        log.append(f"run-{i // 2}", i + 1, "train", f"{i:064x}", 1000 + i, 0.1 * i if i else None,
                   "f" * 64, "sent" if i != 3 else "refused", "" if i != 3 else "budget")
    return log


def lines(path):
    return path.read_text().splitlines()


def test_append_and_verify_intact(tmp_path):
    log = fill(tmp_path / "audit.jsonl")
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[3]["decision"] == "refused" and entries[3]["reason"] == "budget"
    assert entries[0]["epsilon"] is None and entries[2]["epsilon"] == pytest.approx(0.2)
    assert entries[1]["prev"] == entries[0]["hash"]
    assert log.verify() == []
    assert log.head() == {"seq": 4, "hash": entries[-1]["hash"]}
    assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_edited_entry_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = fill(path)
    rows = lines(path)
    e = json.loads(rows[2])
    e["bytes"] = 1  # someone hides how much left the site
    rows[2] = json.dumps(e, sort_keys=True)
    path.write_text("\n".join(rows) + "\n")
    problems = log.verify()
    assert len(problems) == 1 and "line 3" in problems[0] and "edited" in problems[0]


def test_rehashed_edit_still_breaks_the_chain(tmp_path):
    from fedcare.client.audit import entry_hash

    path = tmp_path / "audit.jsonl"
    log = fill(path)
    rows = lines(path)
    e = json.loads(rows[3])
    assert e["decision"] == "refused"
    e["decision"] = "sent"
    e["hash"] = entry_hash(e)  # a careful forger recomputes the entry's own hash
    rows[3] = json.dumps(e, sort_keys=True)
    path.write_text("\n".join(rows) + "\n")
    assert any("prev hash" in p and "line 5" in p for p in log.verify())


def test_deleted_and_reordered_entries_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = fill(path)
    rows = lines(path)
    path.write_text("\n".join(rows[:2] + rows[3:]) + "\n")
    assert any("expected 2" in p for p in log.verify())
    path.write_text("\n".join([rows[0], rows[2], rows[1], rows[3], rows[4]]) + "\n")
    assert log.verify()


def test_truncated_tail_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = fill(path)
    path.write_text("\n".join(lines(path)[:3]) + "\n")
    assert any("cut off the end" in p for p in log.verify())
    (tmp_path / "audit.jsonl.head").unlink()
    assert any("head" in p for p in log.verify())


def test_damaged_last_line_blocks_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = fill(path, 2)
    with open(path, "a") as fh:
        fh.write("garbage\n")
    assert any("not a JSON entry" in p for p in log.verify())
    with pytest.raises(FedcareError, match="damaged"):
        log.append("r", 1, "train", "", 0, None, "", "sent")


def _writer(path, k):
    log = AuditLog(path)
    for i in range(10):
        log.append(f"run-{k}", i, "evaluate", "", i, None, "", "sent")


def test_concurrent_processes_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    log = AuditLog(path)
    assert len(list(log.entries())) == 30
    assert log.verify() == []
