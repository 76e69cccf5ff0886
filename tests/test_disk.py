"""The disk never fills mid-message: a free-space reserve, and a full disk survived.

Run on a small filesystem of its own (a tmpfs that .ci/run mounts and names in
NETSMTP_SMALL_FS), so a full disk is real and touches nothing else.
"""

import os
import smtplib
import uuid

import pytest

from conftest import IN_CI
from netsmtp.queue_cli import send_main
from netsmtp.spool import Spool
from smarthost import CaptureServer, put, run_cli

SMALL_FS = os.environ.get("NETSMTP_SMALL_FS")


@pytest.fixture
def small_fs():
    """A fresh directory on the small filesystem, and fill(leave) to leave that much free."""
    if not SMALL_FS or not os.path.ismount(SMALL_FS):
        message = ("NETSMTP_SMALL_FS names no mounted small filesystem "
                   "(.ci/run mounts a tmpfs there; as root: mount -t tmpfs -o size=8m tmpfs DIR)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    base = os.path.join(SMALL_FS, uuid.uuid4().hex)
    os.makedirs(base)
    fillers = []

    def fill(leave):
        """Take all free space on the filesystem but about leave octets."""
        stat = os.statvfs(base)
        take = stat.f_bavail * stat.f_frsize - leave
        path = os.path.join(SMALL_FS, "filler-%s" % uuid.uuid4().hex)
        fillers.append(path)
        with open(path, "wb") as f:
            while take > 0:
                take -= f.write(b"\0" * min(take, 1 << 20))

    def free():
        for path in fillers:
            os.unlink(path)
        fillers.clear()

    fill.free = free
    yield base, fill
    free()
    import shutil
    shutil.rmtree(base, ignore_errors=True)


def entries(spool_path):
    return [name for name in os.listdir(spool_path) if name.endswith(".msg")]


def test_mail_is_refused_below_the_reserve(server_factory, small_fs):
    """--max-size 100000 keeps 150000 octets free by default: with less free, MAIL gets
    452 4.3.1; once space is freed it is accepted again."""
    base, fill = small_fs
    server = server_factory("--max-size", "100000", spool=os.path.join(base, "spool"))
    fill(100_000)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("c.test")
        assert client.mail("a@c.test") == (452, b"4.3.1 Insufficient system storage, "
                                                b"try again later")
        fill.free()
        assert client.mail("a@c.test")[0] == 250


def test_size_larger_than_the_free_space_less_the_reserve(server_factory, small_fs):
    """SIZE= over the free space less --spool-min-free is 452 4.3.1; a smaller SIZE= passes."""
    base, fill = small_fs
    server = server_factory("--max-size", "1000000", "--spool-min-free", "100000",
                            spool=os.path.join(base, "spool"))
    fill(400_000)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("c.test")
        assert client.mail("a@c.test", ["SIZE=350000"])[0] == 452
        assert client.mail("a@c.test", ["SIZE=200000"])[0] == 250


def test_disk_full_during_data(server_factory, small_fs):
    """The disk fills during DATA: 452 4.3.1, nothing partial in the spool, the server
    goes on serving, and the same message is accepted once space is freed."""
    base, fill = small_fs
    spool = os.path.join(base, "spool")
    server = server_factory("--max-size", "4000000", "--spool-min-free", "1000", spool=spool)
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 998 + b"\r\n") * 600
    fill(200_000)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("c.test")

        def send(message):  # no SIZE=: the client does not say how big it is
            assert client.mail("a@c.test")[0] == 250 and client.rcpt("u@mx.test")[0] == 250
            return client.data(message)
        assert send(big) == (452, b"4.3.1 Insufficient system storage, try again later")
        assert entries(spool) == []
        assert send(b"Subject: small\r\n\r\nhi\r\n")[0] == 250
        assert len(entries(spool)) == 1
        fill.free()
        assert send(big)[0] == 250
    assert len(entries(spool)) == 2


def test_send_on_a_full_disk_sends_nothing_it_cannot_record(small_fs, capsys):
    """netsmtp-send below --spool-min-free writes the state before it sends: on a full
    disk that fails, so nothing is sent and the entry stays; once space is freed the
    message is sent exactly once."""
    base, fill = small_fs
    spool = Spool(os.path.join(base, "spool"))
    spool.prepare()
    queue_id = put(spool, recipients=["u@x.test", "v@x.test"])
    with CaptureServer() as smarthost:
        fill(0)
        args = ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                "--spool-min-free", "1000000", spool.path]
        assert run_cli(send_main, args) == 1
        assert smarthost.messages == [] and spool.queue_ids() == [queue_id]
        assert "not sent" in capsys.readouterr().out
        fill.free()
        assert run_cli(send_main, args) == 0
        assert run_cli(send_main, args) == 0
        assert len(smarthost.messages) == 1 and spool.queue_ids() == []


def test_disk_full_after_a_delivery_repeats_none(small_fs, monkeypatch, capsys):
    """Below the reserve the state written before sending keeps room; when the disk is
    full by the time the outcome is recorded (the new state file cannot be made), the
    outcome goes into that room: the next run retries only the deferred recipient."""
    base, fill = small_fs
    spool = Spool(os.path.join(base, "spool"))
    spool.prepare()
    put(spool, recipients=["u@x.test", "v@x.test"])
    writes = []
    real = Spool.write_state

    def write_state(self, queue_id, data):
        writes.append(queue_id)
        if len(writes) == 2:  # the outcome: the disk is full by now
            fill(0)
        return real(self, queue_id, data)
    monkeypatch.setattr(Spool, "write_state", write_state)
    with CaptureServer() as smarthost:
        smarthost.rcpt_replies["v@x.test"] = "451 4.7.1 greylisted"
        args = ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                "--spool-min-free", "1000000000", spool.path]
        assert run_cli(send_main, args) == 75
        fill.free()
        del smarthost.rcpt_replies["v@x.test"]
        assert run_cli(send_main, args) == 0
        recipients = [r for m in smarthost.messages for r in m.recipients]
    assert sorted(recipients) == ["u@x.test", "v@x.test"] and spool.queue_ids() == []
