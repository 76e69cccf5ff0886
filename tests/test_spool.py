"""The spool: entries, path resolution, claims, state, quarantine, clean-up."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from smarthost import CaptureServer, put, run_cli

from netsmtp.envelope import SCHEMA_VERSION, Envelope, Recipient, Result, Status
from netsmtp.queue_cli import send_main
from netsmtp.runner import QueueRunner
from netsmtp.spool import Busy, resolve


def test_glob_of_spool_names_each_entry_once(spool):
    """`netsmtp-send spool/*`: ID.msg and ID.state name one entry, own folders are skipped."""
    first, second = put(spool), put(spool)
    spool.write_state(first, b"{}")
    os.makedirs(spool.quarantine_dir)
    names = sorted(os.path.join(spool.path, n) for n in os.listdir(spool.path))
    assert any(n.endswith(".state") for n in names) and any(n.endswith("tmp") for n in names)
    entries, problems, spools = resolve(names)
    assert [queue_id for _, queue_id in entries] == [first, second]
    assert problems == [] and len(spools) == 1


def test_non_entries_are_refused_without_opening(spool, tmp_path):
    """A stray file, a missing path or a non-spool directory is a clear problem."""
    stray = os.path.join(spool.path, "README")
    with open(stray, "w") as f:
        f.write("not mail")
    os.chmod(stray, 0)  # opening it would fail: it must not be opened at all
    entries, problems, _ = resolve([stray, tmp_path / "nope", tmp_path])
    assert entries == []
    assert problems == [
        "%s: not a spool entry (expected ID.msg or ID.state)" % stray,
        "%s: no such file or directory" % (tmp_path / "nope"),
        "%s: not a spool directory (it has no tmp/)" % tmp_path]


def test_spool_directory_names_all_entries_oldest_first(spool):
    """A spool directory as PATH means every entry in it, in arrival order."""
    ids = [put(spool) for _ in range(3)]
    entries, problems, _ = resolve([spool.path])
    assert [queue_id for _, queue_id in entries] == ids and problems == []


def test_state_round_trips_through_thaw(spool):
    """ID.state (atomic JSON) is merged into the thawed envelope; ID.msg never changes."""
    queue_id = put(spool, recipients=["a@x.test", "b@x.test"])
    before = open(spool.entry_path(queue_id), "rb").read()
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    envelope.status["a@x.test"] = Recipient("a@x.test", Status.DEFERRED, Result(451, "4.3.0 later"))
    envelope.attempts, envelope.next_attempt = 2, 1234.5
    spool.write_state(queue_id, envelope.freeze_state())
    again = Envelope.thaw(spool.entry_path(queue_id))
    assert again.status["a@x.test"] == Recipient("a@x.test", Status.DEFERRED,
                                                 Result(451, "4.3.0 later"))
    assert again.status["b@x.test"].status == "pending"
    assert (again.attempts, again.due_at) == (2, 1234.5)
    assert open(spool.entry_path(queue_id), "rb").read() == before
    assert os.listdir(spool.tmp) == []


@pytest.mark.parametrize("content, reason", [
    (b"\x80\x81 not json\n", "not JSON"),
    (b'{"version": 99, "id": "x", "recipients": []}\n', "newer"),
    (b'{"version": 1, "id": "000000000000000000000000", "recipients": []}\n', "file name"),
    (b'{"version": 1, "id": "%s", "recipients": [1], "sender": ""}\n', "recipients"),
    (b"no newline at all", "no envelope line"),
])
def test_corrupt_entry_is_quarantined_not_deleted(spool, capsys, content, reason):
    """An unparsable entry is moved to quarantine/, reported, kept byte for byte; exit 1."""
    queue_id = "0660d0000000000000000001"
    content = content.replace(b"%s", queue_id.encode())
    with open(spool.entry_path(queue_id), "wb") as f:
        f.write(content)
    spool.write_state(queue_id, b"{}")
    assert run_cli(send_main, [spool.path]) == 1
    out = capsys.readouterr().out
    assert out.startswith("%s: quarantined (" % queue_id) and reason in out
    assert os.listdir(spool.quarantine_dir) == sorted([queue_id + ".msg", queue_id + ".state"])
    with open(os.path.join(spool.quarantine_dir, queue_id + ".msg"), "rb") as f:
        assert f.read() == content
    assert not os.path.exists(spool.entry_path(queue_id))


@pytest.mark.parametrize("state", [
    b"not json", b'{"recipients": [{"address": "u@x.test", "status": "lost"}], "attempts": 1}',
    b'{"recipients": [], "attempts": 1, "next_attempt": "soon", "last_attempt": null, '
    b'"last_error": null}'])
def test_corrupt_state_quarantines_the_entry(spool, capsys, state):
    """An ID.state that cannot be trusted sends the entry to quarantine, not the smarthost."""
    queue_id = put(spool)
    spool.write_state(queue_id, state)
    assert run_cli(send_main, [spool.path]) == 1
    assert "quarantined" in capsys.readouterr().out
    assert sorted(os.listdir(spool.quarantine_dir)) == [queue_id + ".msg", queue_id + ".state"]


def test_clean_removes_old_debris_and_logs_it(spool, caplog):
    """Old files in tmp/, orphan states and orphan locks go, and each is logged; fresh ones stay."""
    old, fresh = os.path.join(spool.tmp, "old.msg"), os.path.join(spool.tmp, "fresh.msg")
    for path in (old, fresh):
        open(path, "wb").close()
    os.utime(old, (time.time() - 7200,) * 2)
    live = put(spool)
    spool.write_state("0660d0000000000000000002", b"{}")
    open(os.path.join(spool.locks, "0660d0000000000000000002.lock"), "w").close()
    open(os.path.join(spool.locks, "limits.json.lock"), "w").close()  # not ours: kept
    with caplog.at_level("WARNING", logger="netsmtp.spool"):
        removed = spool.clean()
    assert sorted(map(os.path.basename, removed)) == [
        "0660d0000000000000000002.lock", "0660d0000000000000000002.state", "old.msg"]
    assert os.listdir(spool.tmp) == ["fresh.msg"] and os.path.exists(spool.entry_path(live))
    assert os.listdir(spool.locks) == ["limits.json.lock"]
    assert "debris of an interrupted write" in caplog.text


HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from netsmtp.spool import Spool
with Spool(sys.argv[2]).claim(sys.argv[3]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_claim_is_exclusive_and_dies_with_its_process(spool):
    """A claim held by another process makes Busy; after SIGKILL the entry can be claimed."""
    queue_id = put(spool)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, root, spool.path, queue_id],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(Busy):
            with spool.claim(queue_id):
                pass
        outcome = QueueRunner(make_quiet_options(spool)).send_entry(spool, queue_id)
        assert outcome.state == "busy"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with spool.claim(queue_id):
        assert os.path.exists(os.path.join(spool.locks, queue_id + ".lock"))
    assert os.listdir(spool.locks) == []


def make_quiet_options(spool, **values):
    from netsmtp.options import Options
    return Options(spool=spool.path, hostname="mx.test", **values)


class Recording(QueueRunner):
    """A custom delivery step: record instead of sending."""

    delivered = []

    def deliver(self, envelope, recipients):
        with envelope.open() as message:
            Recording.delivered.append((envelope.id, recipients, message.read()))
        return {r: Result(250, "2.0.0 recorded") for r in recipients}


def test_thawed_envelope_sends_itself(spool):
    """Envelope.thaw(path).send() forwards to the smarthost and removes the entry."""
    queue_id = put(spool, recipients=["u@x.test"])
    with CaptureServer() as smarthost:
        runner = QueueRunner(make_quiet_options(spool, smarthost=smarthost.address,
                                                smarthost_tls="off"))
        with runner:
            outcome = Envelope.thaw(spool.entry_path(queue_id)).send(runner)
    assert outcome.results["u@x.test"][0] == "delivered"
    assert smarthost.delivered_to() == ["u@x.test"]
    assert spool.queue_ids() == []


def test_runner_subclass_overrides_the_delivery_step(spool):
    """QueueRunner.deliver() is the one delivery hook; the spool bookkeeping stays."""
    queue_id = put(spool, recipients=["u@x.test", "v@x.test"])
    Recording.delivered.clear()
    with Recording(make_quiet_options(spool)) as runner:
        outcome = Envelope.thaw(spool.entry_path(queue_id)).send(runner)
    assert Recording.delivered == [(queue_id, ["u@x.test", "v@x.test"],
                                    b"Received: from c.test\r\nSubject: hi\r\n\r\nhello\r\n")]
    assert outcome.state == "sent" and spool.queue_ids() == []


def test_typed_records_keep_the_json_of_the_spool(spool):
    """A recipient's record is a dataclass with an enum status; ID.state is the same JSON."""
    queue_id = put(spool, recipients=["u@x.test"])
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    record = envelope.status["u@x.test"]
    assert record == Recipient("u@x.test") and record.status is Status.PENDING
    record.status, record.reply = Status.DEFERRED, Result(451, "4.7.1 later")
    spool.write_state(queue_id, envelope.freeze_state())
    data = json.loads(open(spool.state_path(queue_id), "rb").read())
    assert data["recipients"] == [{"address": "u@x.test", "status": "deferred",
                                   "error": "451 4.7.1 later", "reports": [], "remote_mta": None}]
    again = Envelope.thaw(spool.entry_path(queue_id)).status["u@x.test"]
    assert again.reply == Result(451, "4.7.1 later") and again.reply.status is Status.DEFERRED


def test_state_file_is_plain_json(spool):
    """The state is JSON data with a schema version, readable by anything."""
    queue_id = put(spool)
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    data = json.loads(envelope.freeze_state())
    assert data["version"] == SCHEMA_VERSION and data["recipients"][0]["address"] == "u@x.test"


def test_group_commit_holds_claims_until_the_directory_fsync(spool):
    """A removed entry stays claimed until sync() has made its removal durable."""
    class Runner(QueueRunner):
        remove_batch = 32

        def deliver(self, envelope, recipients):
            return {r: Result(250, "2.0.0 ok") for r in recipients}

    queue_id = put(spool)
    runner = Runner(make_quiet_options(spool))
    outcome = runner.send_entry(spool, queue_id)
    assert outcome.removed and spool.queue_ids() == []
    with pytest.raises(Busy):
        spool.claim(queue_id).acquire()
    runner.close()
    with spool.claim(queue_id):
        pass
    assert os.listdir(spool.locks) == []


SCHEMA_1_ENTRY = (
    b'{"version":1,"id":"0660d0000000000000000003","sender":"a@b.test",'
    b'"recipients":["u@x.test"],"helo":"c.test","client":"192.0.2.1","protocol":"ESMTP",'
    b'"params":{"SIZE":40},"tls":null,"auth":null,"arrival":1700000000.5}\n'
    b"Received: from c.test\r\nSubject: old\r\n\r\nschema one\r\n")


def test_schema_1_entries_are_still_listed_and_sent(spool, capsys):
    """An entry written before the commit line (schema 1) is listed and sent as before."""
    from netsmtp.queue_cli import queue_main
    queue_id = "0660d0000000000000000003"
    with open(spool.entry_path(queue_id), "wb") as f:
        f.write(SCHEMA_1_ENTRY)
    assert run_cli(queue_main, ["--spool", spool.path, "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    message = SCHEMA_1_ENTRY.split(b"\n", 1)[1]
    assert entry["id"] == queue_id and entry["size"] == len(message)
    with CaptureServer() as smarthost:
        assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                                   spool.path]) == 0
    [sent] = smarthost.messages
    assert sent.recipients == ["u@x.test"] and sent.data == message
    assert spool.queue_ids() == []


def test_entry_format_commit_line_first(spool):
    """A new entry starts with its 64-octet commit line: the length and CRC-32 of the rest."""
    import zlib

    from netsmtp.spool import COMMIT_LINE_SIZE
    queue_id = put(spool)
    with open(spool.entry_path(queue_id), "rb") as f:
        data = f.read()
    line, rest = data[:COMMIT_LINE_SIZE], data[COMMIT_LINE_SIZE:]
    assert line == b"netsmtp entry complete size=%020d crc32=%08x\n" % (
        len(rest), zlib.crc32(rest))
    assert json.loads(rest.split(b"\n", 1)[0])["version"] == SCHEMA_VERSION


def test_a_spool_directly_under_a_folder_named_tmp_is_still_a_spool():
    """/tmp/SPOOL is a spool, not something inside a spool's tmp/ folder (netsmtp-send /tmp/q)."""
    import shutil
    import tempfile

    from netsmtp.spool import Spool
    path = tempfile.mkdtemp(prefix="netsmtp-spool-", dir="/tmp")
    try:
        spool = Spool(path)
        spool.prepare()
        queue_id = put(spool)
        entries, problems, _ = resolve([path])
        assert [queue_id for _, queue_id in entries] == [queue_id] and problems == []
        assert resolve([os.path.join(path, "tmp", queue_id + ".msg")])[0] == []
    finally:
        shutil.rmtree(path)


def test_older_entries_and_states_read_without_dsn_held_or_reports(spool, capsys):
    """Schema 1 and 2 entries have no dsn/expanded, their states no reports/held/remote_mta:
    they thaw as "no DSN request, not held, nothing reported"."""
    from netsmtp.queue_cli import queue_main
    queue_id = "0660d0000000000000000003"
    with open(spool.entry_path(queue_id), "wb") as f:
        f.write(SCHEMA_1_ENTRY)
    with open(spool.state_path(queue_id), "wb") as f:
        f.write(b'{"version": 2, "id": "%s", "attempts": 1, "next_attempt": 1700000300, '
                b'"last_attempt": 1700000000, "last_error": "451 4.7.1 later", "recipients": '
                b'[{"address": "u@x.test", "status": "deferred", "error": "451 4.7.1 later"}]}\n'
                % queue_id.encode())
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    record = envelope.status["u@x.test"]
    assert (record.notify, record.orcpt, record.reports, record.remote) == (None, None, set(), None)
    assert record.status is Status.DEFERRED and not envelope.held and envelope.dsn == {}
    assert run_cli(queue_main, ["--spool", spool.path, "--hold", queue_id]) == 0
    assert Envelope.thaw(spool.entry_path(queue_id)).held
