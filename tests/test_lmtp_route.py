"""The lmtp delivery route (netsmtp.lmtp) against real LMTP servers.

Dovecot's lmtp (a private `dovecot -F` with its own configuration, mail
stored under a non-root uid, one user over quota) and Postfix's
`smtp-sink -L` are the peers; each recipient's reply after the dot must
become that recipient's own outcome (RFC 2033 section 4.2).
"""

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile

import pytest
from conftest import need_tool, wait_for
from smarthost import put, run_cli
from test_reports import fields, reports
from test_reports import put as put_dsn
from test_send import bounces, state_of

from netsmtp.queue_cli import send_main

MAIL_UID = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
MAIL_GID = pwd.getpwnam("nobody").pw_gid if os.geteuid() == 0 else os.getegid()


def connectable(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


class Dovecot:
    """A private Dovecot serving LMTP on DIR/lmtp.sock; users u1, u2 and full (1 KB quota)."""

    def __init__(self):
        need_tool("dovecot")
        if os.geteuid() != 0:
            pytest.skip("a private dovecot -F needs root to switch to the mail uid")
        # Not under tmp_path: the mail uid must be able to reach its home.
        self.dir = tempfile.mkdtemp(prefix="netsmtp-dovecot-")
        os.chmod(self.dir, 0o755)
        self.mail = os.path.join(self.dir, "mail")
        os.mkdir(self.mail)
        os.chown(self.mail, MAIL_UID, MAIL_GID)
        self.socket = os.path.join(self.dir, "lmtp.sock")
        users = os.path.join(self.dir, "users")
        with open(users, "w") as f:
            for user in ("u1", "u2", "full"):
                extra = "userdb_quota_rule=*:storage=1K" if user == "full" else ""
                f.write("%s:{plain}x:%d:%d::%s/%s::%s\n" % (user, MAIL_UID, MAIL_GID,
                                                           self.mail, user, extra))
        self.config = os.path.join(self.dir, "dovecot.conf")
        with open(self.config, "w") as f:
            f.write(DOVECOT_CONF % {"dir": self.dir, "users": users, "socket": self.socket})
        self.log_path = os.path.join(self.dir, "log")
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", self.config],
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: connectable(self.socket) or self.proc.poll() is not None,
                 what="dovecot's lmtp socket")
        if self.proc.poll() is not None:
            raise RuntimeError("dovecot did not start: %s" % self.log())

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def messages(self, user):
        """The messages in user's INBOX (new/), as bytes."""
        folder = os.path.join(self.mail, user, "Maildir", "new")
        if not os.path.isdir(folder):
            return []
        found = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            assert os.stat(path).st_uid == MAIL_UID
            with open(path, "rb") as f:
                found.append(f.read())
        return found

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


DOVECOT_CONF = """\
base_dir = %(dir)s/run
state_dir = %(dir)s/state
protocols = lmtp
ssl = no
log_path = /dev/stderr
auth_username_format = %%Ln
mail_location = maildir:~/Maildir
mail_plugins = quota
plugin {
  quota = maildir:User quota
}
passdb {
  driver = passwd-file
  args = %(users)s
}
userdb {
  driver = passwd-file
  args = %(users)s
}
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    port = 0
  }
}
service lmtp {
  unix_listener %(socket)s {
    mode = 0666
  }
}
"""


@pytest.fixture
def dovecot():
    server = Dovecot()
    yield server
    server.stop()


def final_recipients(report):
    """The Final-Recipient addresses of a bounce's delivery-status part."""
    text = report.as_string()
    return re.findall(r"Final-Recipient: *rfc822; *(\S+)", text, re.IGNORECASE)


def send(spool, *args):
    return run_cli(send_main, ["--hostname", "mx.test", "--routes", "local.test=lmtp,*=smarthost",
                               *args, spool.path])


BIG = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 40  # over the 1 KB quota of "full"


def test_dovecot_gives_each_recipient_its_own_outcome(spool, dovecot):
    """One message to u1, full (over quota), nouser and u2: u1 and u2 delivered
    into their Maildirs, full bounced with Dovecot's own 552 5.2.2 after the dot,
    nouser bounced with its 550 5.1.1 at RCPT; nothing left in the spool."""
    queue_id = put(spool, recipients=["u1@local.test", "full@local.test",
                                      "nouser@local.test", "u2@local.test"],
                   body=BIG * 30)
    assert send(spool, "--lmtp-host", "unix:" + dovecot.socket) == 0
    assert len(dovecot.messages("u1")) == 1 and len(dovecot.messages("u2")) == 1
    assert dovecot.messages("full") == []
    # Dovecot stores LF line ends.
    assert dovecot.messages("u1")[0].endswith((BIG * 30).replace(b"\r\n", b"\n"))
    assert queue_id not in spool.queue_ids()
    [(bounce, report)] = bounces(spool)
    text = report.as_string()
    assert "552 5.2.2" in text and "Quota exceeded" in text
    assert "550 5.1.1" in text
    assert final_recipients(report) == ["full@local.test", "nouser@local.test"]


def test_dovecot_one_connection_for_the_run(spool, dovecot):
    """Several messages, one LMTP connection (one LHLO) for the whole run."""
    for n in range(4):
        put(spool, recipients=["u1@local.test"], body=b"Subject: %d\r\n\r\nhi\r\n" % n)
    assert send(spool, "--lmtp-host", "unix:" + dovecot.socket) == 0
    assert len(dovecot.messages("u1")) == 4
    # Dovecot names each delivery SESSION:Tn after its session's id.
    sessions = set(re.findall(r"<([^<>:]+)(?::T\d+)?>: Info: msgid=\S+: saved mail",
                              dovecot.log()))
    assert len(sessions) == 1
    assert spool.queue_ids() == []


def test_dovecot_duplicate_replies_are_counted_per_rcpt(spool, dovecot):
    """The envelope holds each recipient once; Dovecot's replies line up with the
    RCPTs even when one recipient fails in the middle, so u2 gets u2's reply."""
    put(spool, recipients=["full@local.test", "u2@local.test"], body=BIG * 30)
    assert send(spool, "--lmtp-host", "unix:" + dovecot.socket) == 0
    assert len(dovecot.messages("u2")) == 1
    [(bounce, report)] = bounces(spool)
    assert final_recipients(report) == ["full@local.test"]


def start_sink(tmp_path, *flags):
    """Postfix's LMTP server, smtp-sink -L, on a Unix socket; dumps to tmp_path/dump."""
    path = need_tool("smtp-sink")
    sock = str(tmp_path / "sink.sock")
    user = ["-u", "root"] if os.geteuid() == 0 else []
    os.makedirs(tmp_path / "dump", exist_ok=True)
    sink = subprocess.Popen([path, *user, "-L", "-d", str(tmp_path / "dump" / "%M."), *flags,
                             "unix:" + sock, "10"], stderr=subprocess.PIPE)
    wait_for(lambda: connectable(sock), what="smtp-sink -L")
    return sink, sock


@pytest.fixture
def lmtp_sink(tmp_path):
    started = []

    def start(*flags):
        sink, sock = start_sink(tmp_path, *flags)
        started.append(sink)
        return sock
    yield start
    for sink in started:
        sink.kill()
        sink.wait()


def test_smtp_sink_lmtp_gets_every_message_once(spool, lmtp_sink, tmp_path):
    """smtp-sink -L receives each message once, with every recipient."""
    sock = lmtp_sink()
    for n in range(3):
        put(spool, recipients=["a@local.test", "b@local.test"], body=b"Subject: %d\r\n\r\nx\r\n" % n)
    assert send(spool, "--lmtp-host", "unix:" + sock) == 0
    dumps = [p.read_bytes() for p in (tmp_path / "dump").iterdir()]
    assert len(dumps) == 3
    assert all(b"X-Rcpt-Args: <a@local.test>" in d and b"X-Rcpt-Args: <b@local.test>" in d
               for d in dumps)
    assert spool.queue_ids() == []


def test_soft_failure_after_the_dot_defers_each_recipient(spool, lmtp_sink):
    """smtp-sink -L -r . answers 450 per recipient after the dot: both deferred, exit 75."""
    sock = lmtp_sink("-r", ".")
    queue_id = put(spool, recipients=["a@local.test", "b@local.test"])
    assert send(spool, "--lmtp-host", "unix:" + sock) == 75
    state = state_of(spool, queue_id)
    assert [state.status[r].to_json()["status"] for r in ("a@local.test", "b@local.test")] == [
        "deferred", "deferred"]
    assert state.status["a@local.test"].to_json()["error"].startswith("450 4.3.0")
    assert bounces(spool) == []


def test_hard_failure_after_the_dot_bounces(spool, lmtp_sink):
    """smtp-sink -L -f . answers 5xx per recipient after the dot: bounced."""
    sock = lmtp_sink("-f", ".")
    queue_id = put(spool, recipients=["a@local.test"])
    assert send(spool, "--lmtp-host", "unix:" + sock) == 0
    assert queue_id not in spool.queue_ids()
    assert len(bounces(spool)) == 1


def test_unreachable_lmtp_defers(spool, tmp_path):
    """No server on the socket: deferred with 451 4.4.1, exit 75, the entry kept."""
    queue_id = put(spool, recipients=["a@local.test"])
    assert send(spool, "--lmtp-host", "unix:%s" % (tmp_path / "none.sock")) == 75
    error = state_of(spool, queue_id).status["a@local.test"].to_json()["error"]
    assert error.startswith("451 4.4.1")


def test_lmtp_host_from_toml_over_tcp(spool, tmp_path):
    """TOML lmtp_host = "HOST:PORT" reaches smtp-sink -L over TCP; other domains
    still take their own route."""
    path = need_tool("smtp-sink")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    user = ["-u", "root"] if os.geteuid() == 0 else []
    os.makedirs(tmp_path / "dump")
    sink = subprocess.Popen([path, *user, "-L", "-d", str(tmp_path / "dump" / "%M."),
                             "127.0.0.1:%d" % port, "10"], stderr=subprocess.PIPE)
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return True
            except OSError:
                return False
        wait_for(up, what="smtp-sink -L on TCP")
        config = tmp_path / "netsmtp.toml"
        config.write_text('lmtp_host = "127.0.0.1:%d"\n[routes]\n"local.test" = "lmtp"\n'
                          '"*" = "maildir"\n' % port)
        put(spool, recipients=["a@local.test"])
        assert run_cli(send_main, ["--hostname", "mx.test", "--config", config,
                                   spool.path]) == 0
        assert len(list((tmp_path / "dump").iterdir())) == 1
    finally:
        sink.kill()
        sink.wait()


def test_dry_run_names_the_lmtp_target(spool, capsys):
    put(spool, recipients=["a@local.test"])
    assert send(spool, "--lmtp-host", "unix:/run/dovecot/lmtp", "--dry-run") == 0
    assert "lmtp unix:/run/dovecot/lmtp" in capsys.readouterr().out


def test_dsn_request_goes_to_an_lmtp_server_that_offers_dsn(spool, lmtp_sink, tmp_path):
    """smtp-sink -L offers DSN: RET, ENVID, NOTIFY and ORCPT go to it, and netsmtp
    sends no report of its own (the server reports itself)."""
    sock = lmtp_sink()
    put_dsn(spool, recipients=["u@local.test", "v@local.test"],
            params={"RET": "HDRS", "ENVID": "QQ314159"},
            dsn={"u@local.test": {"notify": ["SUCCESS", "DELAY"],
                                  "orcpt": "rfc822;Orig@local.test"}})
    assert send(spool, "--lmtp-host", "unix:" + sock) == 0
    [dump] = [p.read_bytes() for p in (tmp_path / "dump").iterdir()]
    assert b"X-Mail-Args: <a@b.test> RET=HDRS ENVID=QQ314159" in dump
    assert b"X-Rcpt-Args: <u@local.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig@local.test" in dump
    assert b"X-Rcpt-Args: <v@local.test> ORCPT=rfc822;v@local.test" in dump
    assert reports(spool) == []


def test_dovecot_without_dsn_gets_no_parameters_and_a_delivered_report(spool, dovecot):
    """Dovecot's lmtp offers no DSN: no DSN parameters, and NOTIFY=SUCCESS gets a
    "delivered" report from netsmtp, since an LMTP 250 is final delivery."""
    put_dsn(spool, recipients=["u1@local.test"], params={"ENVID": "QQ1"},
            dsn={"u1@local.test": {"notify": ["SUCCESS"], "orcpt": "rfc822;u1@local.test"}})
    assert send(spool, "--lmtp-host", "unix:" + dovecot.socket) == 0
    [message] = dovecot.messages("u1")
    assert b"QQ1" not in message
    [(_, _, report)] = reports(spool)
    _, [per_recipient] = fields(report)
    assert per_recipient["Action"] == "delivered" and per_recipient["Status"] == "2.0.0"


def test_dovecot_takes_a_large_message_in_bdat_chunks(spool, dovecot):
    """Dovecot offers CHUNKING: a 2.5 MB message goes in BDAT chunks of 1 MiB, and
    BDAT LAST gets one reply per recipient; both mailboxes hold the whole message."""
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2500
    put(spool, recipients=["u1@local.test", "u2@local.test"], body=body)
    assert send(spool, "--lmtp-host", "unix:" + dovecot.socket) == 0
    for user in ("u1", "u2"):
        [message] = dovecot.messages(user)
        assert message.endswith(body.replace(b"\r\n", b"\n"))
    assert spool.queue_ids() == []
