"""Policy services (Postfix SMTPD_POLICY_README) against Debian's postfwd, postgrey and
policyd-rate-limit, plus a scripted service for the failures real ones do not make."""

import grp
import os
import pwd
import smtplib
import socket
import subprocess
import threading
import time

import pytest
from conftest import Conversation, free_port, make_options, need_tool, spooled, wait_for

from netsmtp.envelope import Envelope
from netsmtp.policy_service import encode_query, parse_action

USER = pwd.getpwuid(os.getuid()).pw_name
GROUP = grp.getgrgid(os.getgid()).gr_name
HELLO = [b"EHLO client.test", b"MAIL FROM:<a@example.test>"]


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def peer(tmp_path):
    """start(argv, port): run a policy service and wait until it accepts connections."""
    started = []

    def start(argv, port):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=str(tmp_path))
        started.append(proc)
        wait_for(lambda: listening(port) or proc.poll() is not None, what=argv[0])
        assert proc.poll() is None, proc.stderr.read().decode()
        return proc
    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def postfwd(peer, tmp_path):
    """postfwd1 on a free port with one rule per behaviour, keyed by recipient."""
    postfwd1 = need_tool("postfwd1")
    port = free_port()
    rules = {
        "blocked@example.test": "REJECT blocked by postfwd",
        "deferred@example.test": "DEFER_IF_PERMIT come back later",
        "coded@example.test": "551 5.1.6 moved away",
        "tagged@example.test": "PREPEND X-Postfwd: tagged",
        "moved@example.test": "REDIRECT new@example.test",
        "dropped@example.test": "DISCARD spam",
        "filtered@example.test": "FILTER smtp:[127.0.0.1]:10025",
        "badcode@example.test": "250 fine",
        "held@example.test": "HOLD suspect",
    }
    argv = [postfwd1, "-d", "--nodns", "--pidfile", str(tmp_path / "postfwd.pid"),
            "-u", USER, "-g", GROUP, "-i", "127.0.0.1", "-p", str(port), "--cache=0"]
    for number, (recipient, action) in enumerate(rules.items()):
        argv += ["-r", "id=R%d; recipient==%s; action=%s" % (number, recipient, action)]
    argv += ["-r", "id=LAST; action=DUNNO"]
    # -d daemonizes: the process started exits, the daemon keeps the port.
    subprocess.run(argv, check=True, timeout=30, stdout=subprocess.DEVNULL)
    wait_for(lambda: listening(port), what="postfwd")
    yield "127.0.0.1:%d" % port
    with open(tmp_path / "postfwd.pid") as f:
        os.kill(int(f.read().strip()), 15)


def converse_with(tmp_path, spool, **options):
    return Conversation(make_options(tmp_path, **options), spool, peer="127.0.0.1")


def message_to(*recipients):
    return HELLO + [b"RCPT TO:<%s>" % r.encode() for r in recipients] + [
        b"DATA", b"Subject: policy\r\n\r\nbody\r\n.", b"QUIT"]


def read_entry(spool):
    [name] = spooled(spool)
    with open(os.path.join(spool.path, name), "rb") as f:
        return f.read()


def test_postfwd_actions_at_rcpt(postfwd, tmp_path, spool):
    """REJECT is 550 5.7.1, DEFER_IF_PERMIT 450 4.7.1, a code is kept, DUNNO goes on;
    an unknown action (FILTER) and an invalid code get the default action."""
    converse = converse_with(tmp_path, spool, policy_services=postfwd)
    replies = converse(message_to(
        "blocked@example.test", "deferred@example.test", "coded@example.test",
        "filtered@example.test", "badcode@example.test", "plain@example.test"))
    rcpts = [lines[0] for _, lines in replies[3:9]]
    assert rcpts == ["550 5.7.1 blocked by postfwd",
                     "450 4.7.1 come back later",
                     "551 5.1.6 moved away",
                     "451 4.3.5 Server configuration problem",
                     "451 4.3.5 Server configuration problem",
                     "250 2.1.5 Recipient <plain@example.test> OK"]
    assert replies[-2][0] == 250
    assert b'"recipients":["plain@example.test"]' in read_entry(spool)


def test_postfwd_prepend_redirect_and_discard(postfwd, tmp_path, spool):
    """PREPEND adds the header to the spooled message, above netsmtp's own Received as
    Postfix's smtpd puts it; REDIRECT replaces the recipients; DISCARD answers 250 and
    keeps nothing."""
    converse = converse_with(tmp_path, spool, policy_services=postfwd)
    assert converse.codes(message_to("tagged@example.test", "moved@example.test"))[-2] == 250
    entry = read_entry(spool)
    assert b'"recipients":["new@example.test"]' in entry
    message = entry.split(b"\n", 2)[2]  # after the entry's own two lines
    assert message.startswith(b"X-Postfwd: tagged\r\nReceived: from client.test ")
    assert b";\r\n\t" in message and b"\r\nSubject: policy\r\n\r\nbody\r\n" in message
    os.unlink(os.path.join(spool.path, spooled(spool)[0]))
    assert converse.codes(message_to("dropped@example.test"))[-2] == 250
    assert spooled(spool) == []


def test_postfwd_hold_keeps_the_message_held(postfwd, tmp_path, spool):
    """HOLD accepts the message and holds it (the queue control's held flag), so
    netsmtp-send leaves it until netsmtp-queue --release."""
    converse = converse_with(tmp_path, spool, policy_services=postfwd)
    assert converse.codes(message_to("held@example.test"))[-2] == 250
    [name] = spooled(spool)
    assert Envelope.thaw(os.path.join(spool.path, name)).held is True


def test_postfwd_through_the_command_line(postfwd, server_factory):
    """--policy-service on the daemon's command line, given twice, both asked."""
    server = server_factory("--policy-service", postfwd, "--policy-service", postfwd)
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        assert client.rcpt("blocked@example.test") == (550, b"5.7.1 blocked by postfwd")
        assert client.rcpt("ok@example.test")[0] == 250


def test_postgrey_greylists_then_accepts_and_prepends(peer, tmp_path, spool):
    """postgrey: a first attempt gets 450 4.7.1 Greylisted; a retry after the delay is
    accepted, with postgrey's X-Greylist header in the spooled message."""
    postgrey = need_tool("postgrey")
    port = free_port()
    (tmp_path / "pg").mkdir()
    peer([postgrey, "--inet=127.0.0.1:%d" % port, "--dbdir=%s" % (tmp_path / "pg"),
          "--delay=1", "--pidfile=%s" % (tmp_path / "pg.pid"), "--user=" + USER,
          "--group=" + GROUP, "--auto-whitelist-clients=0",
          "--whitelist-clients=/dev/null", "--whitelist-recipients=/dev/null"], port)
    converse = converse_with(tmp_path, spool, policy_services="127.0.0.1:%d" % port)
    first = converse(message_to("greylisted@example.test"))
    assert first[3][0] == 450 and first[3][1][0].startswith("450 4.7.1 Greylisted")
    assert spooled(spool) == []
    time.sleep(2.1)  # greylisting is a delay: postgrey accepts only after --delay seconds
    assert converse.codes(message_to("greylisted@example.test"))[-2] == 250
    assert b"\nX-Greylist: delayed " in read_entry(spool)


def test_policyd_rate_limit_defers_over_the_limit(peer, tmp_path, spool):
    """policyd-rate-limit, 2 recipients a minute by client address: the third is deferred."""
    need_tool("policyd-rate-limit")
    port = free_port()
    config = tmp_path / "rate.yaml"
    config.write_text(
        'debug: False\nuser: "%s"\ngroup: "%s"\npidfile: "%s"\nbackend: 0\n'
        'sqlite_config:\n    database: "%s"\nSOCKET: ["127.0.0.1", %d]\n'
        'limits:\n    - [2, 60]\nlimits_by_id: {}\nlimit_by_sasl: False\n'
        'limit_by_sender: False\nlimit_by_ip: True\nlimited_networks: ["127.0.0.0/8"]\n'
        'success_action: "dunno"\n'
        'fail_action: "defer_if_permit Rate limit reach, retry later"\n'
        'db_error_action: "dunno"\nreport: False\n'
        % (USER, GROUP, tmp_path / "rate.pid", tmp_path / "rate.sqlite3", port))
    peer(["/usr/bin/python3", "/usr/bin/policyd-rate-limit", "--file", str(config)], port)
    converse = converse_with(tmp_path, spool, policy_services="127.0.0.1:%d" % port)
    replies = converse(message_to("a@example.test", "b@example.test", "c@example.test"))
    assert [lines[0] for _, lines in replies[3:6]][2] == "450 4.7.1 Rate limit reach, retry later"
    assert [code for code, _ in replies[3:5]] == [250, 250]


class ScriptedService:
    """A policy service that answers each query with the next of answers (bytes, or None
    to close without answering); it records the queries it got."""

    def __init__(self, answers, unix_path=None):
        self.answers = list(answers)
        self.queries = []
        if unix_path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        else:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(unix_path)
            self.listener.listen()
            self.address = "unix:" + unix_path
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn):
        try:
            self.answer(conn)
        except OSError:
            pass  # the client gave up on a slow or broken answer

    def answer(self, conn):
        with conn:
            data = b""
            while True:
                while b"\n\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                query, data = data.split(b"\n\n", 1)
                self.queries.append(dict(line.split("=", 1) for line in
                                         query.decode().split("\n")))
                answer = self.answers.pop(0) if self.answers else b"action=DUNNO\n\n"
                if answer is None:
                    return
                if answer == b"silence":
                    time.sleep(5)
                    return
                conn.sendall(answer)

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("answers", [
    [None, None],                                   # closes without answering, twice
    [b"action=REJECT a\r\n\n"],                     # CR in the answer
    [b"action=" + b"x" * (1 << 20) + b"\n\n"],      # a 1 MB line
    [b"no equals sign\n\n"],                        # not an attribute
    [b"result=ok\n\n"],                             # no action
    [b"silence"],                                   # slower than --policy-timeout
], ids=["closed", "cr", "huge", "garbage", "no-action", "slow"])
def test_a_failing_service_gets_the_default_action(answers, tmp_path, spool):
    """Down, slow or garbage: --policy-default-action, never OK."""
    service = ScriptedService(answers)
    try:
        converse = converse_with(tmp_path, spool, policy_services=service.address,
                                 policy_timeout=0.5)
        replies = converse(message_to("u@example.test"))
    finally:
        service.close()
    assert replies[3][1] == ["451 4.3.5 Server configuration problem"]


def test_default_action_is_configurable_and_checked(tmp_path, spool):
    """--policy-default-action takes an action; one netsmtp does not take is refused at start."""
    port = free_port()  # nothing listens there
    converse = converse_with(tmp_path, spool, policy_services="127.0.0.1:%d" % port,
                             policy_default_action="DEFER_IF_PERMIT policy down")
    assert converse(message_to("u@example.test"))[3][1] == ["450 4.7.1 policy down"]
    from netsmtp.options import OptionError, Options
    with pytest.raises(OptionError):
        Options(policy_default_action="FILTER smtp:x")


def test_attributes_instance_and_end_of_message(tmp_path, spool):
    """Postfix's attribute names; instance is constant within a message and new for the
    next; --policy-end-of-message asks again with the size, count and queue id."""
    service = ScriptedService([])
    try:
        converse = converse_with(tmp_path, spool, policy_services=service.address,
                                 policy_end_of_message=True)
        converse(message_to("u@example.test", "v@example.test")[:-1] +
                 message_to("w@example.test")[1:])
    finally:
        service.close()
    first, second, end, third, end2 = service.queries
    assert first["request"] == "smtpd_access_policy" and first["protocol_state"] == "RCPT"
    assert first["protocol_name"] == "ESMTP" and first["helo_name"] == "client.test"
    assert first["sender"] == "a@example.test" and first["recipient"] == "u@example.test"
    assert first["client_address"] == "127.0.0.1" and first["client_name"] == "unknown"
    assert first["recipient_count"] == "0"
    assert first["instance"] == second["instance"] == end["instance"] != third["instance"]
    assert end["protocol_state"] == "END-OF-MESSAGE" and end["recipient_count"] == "2"
    assert end["recipient"] == "" and int(end["size"]) > 0 and len(end["queue_id"]) == 24
    assert end2["recipient"] == "w@example.test"


def test_end_of_message_rejection_leaves_nothing(tmp_path, spool):
    """A REJECT at END-OF-MESSAGE is the reply to the final dot; nothing is spooled."""
    service = ScriptedService([b"action=DUNNO\n\n", b"action=REJECT 5.7.0 no thanks\n\n"])
    try:
        converse = converse_with(tmp_path, spool, policy_services=service.address,
                                 policy_end_of_message=True)
        replies = converse(message_to("u@example.test"))
    finally:
        service.close()
    assert replies[-2][1] == ["550 5.7.0 no thanks"]
    assert spooled(spool) == [] and os.listdir(spool.tmp) == []


def test_a_value_can_never_add_an_attribute():
    """CR, LF and NUL never reach the socket: the request keeps one line per attribute."""
    data = encode_query({"request": "smtpd_access_policy",
                         "helo_name": "x\nclient_address=127.0.0.1\r\0"})
    assert data.count(b"\n") == 3 and b"\r" not in data and b"\0" not in data
    assert data.split(b"\n")[1].startswith(b"helo_name=x client_address")


@pytest.mark.parametrize("text, reply", [
    ("OK", None), ("dunno", None), ("", None),
    ("REJECT", "550 5.7.1 Access denied"),
    ("DEFER", "450 4.7.1 Try again later"),
    ("defer_if_permit Rate limit", "450 4.7.1 Rate limit"),
    ("450 try later", "450 4.7.1 try later"),
    ("554 5.7.9 go", "554 5.7.9 go"),
])
def test_action_mapping(text, reply):
    """The actions map as the issue says: Postfix's, with REJECT as 550 5.7.1."""
    action = parse_action(text)
    assert (str(action.reply) if action.reply else None) == reply


@pytest.mark.parametrize("text", ["FILTER smtp:x", "BCC a@b", "WARN x", "250 ok",
                                  "550 4.7.1 class", "PREPEND no header", "REDIRECT",
                                  "554 5.7.1 \x01"])
def test_actions_netsmtp_does_not_take_are_errors(text):
    with pytest.raises(ValueError):
        parse_action(text)


def test_a_service_on_a_unix_socket(tmp_path, spool):
    """unix:PATH reaches a service on a Unix socket."""
    service = ScriptedService([b"action=REJECT 5.7.1 over a unix socket\n\n"],
                              unix_path=str(tmp_path / "policy.sock"))
    try:
        converse = converse_with(tmp_path, spool, policy_services=service.address)
        replies = converse(message_to("u@example.test"))
    finally:
        service.close()
    assert replies[3][1] == ["550 5.7.1 over a unix socket"]


def test_toml_lists_and_bad_addresses(tmp_path):
    """TOML policy_services and milters are lists; a bad address is a usage error, exit 2."""
    from netsmtp.cli import main
    from netsmtp.options import Options, load_toml
    config = tmp_path / "netsmtp.toml"
    config.write_text('policy_services = ["127.0.0.1:10023", "unix:/run/p.sock"]\n'
                      'milters = ["inet:8891@127.0.0.1", "unix:/run/m.sock"]\n')
    options = Options(**load_toml(str(config)))
    assert options.policy_services == (("inet", ("127.0.0.1", 10023)), ("unix", "/run/p.sock"))
    assert options.milters == (("inet", ("127.0.0.1", 8891)), ("unix", "/run/m.sock"))
    for flag in ("--policy-service", "--milter"):
        with pytest.raises(SystemExit) as exit_:
            main([flag, "nowhere", "--spool", str(tmp_path / "spool")])
        assert exit_.value.code == 2


def test_lmtp_gets_a_filter_refusal_once_per_recipient(tmp_path, spool):
    """LMTP (RFC 2033 section 4.2): a policy refusal at the end of the message is one
    reply per successful RCPT, each the service's own."""
    from netsmtp.lmtp_session import LMTPSession
    service = ScriptedService([b"action=DUNNO\n\n", b"action=DUNNO\n\n",
                               b"action=550 5.7.1 not for you\n\n"])
    try:
        converse = Conversation(make_options(tmp_path, policy_services=service.address,
                                             policy_end_of_message=True),
                                spool, session_class=LMTPSession, peer="127.0.0.1")
        replies = converse([b"LHLO client.test", b"MAIL FROM:<a@example.test>",
                            b"RCPT TO:<u@example.test>", b"RCPT TO:<v@example.test>", b"DATA",
                            b"Subject: x\r\n\r\nx\r\n.", b"QUIT"])
    finally:
        service.close()
    assert [lines for _, lines in replies[-3:-1]] == [["550 5.7.1 not for you"]] * 2
    assert spooled(spool) == []


def test_the_request_matches_postfix(tmp_path, spool):
    """Differential: a private Postfix asks a capture service about the same RCPT; every
    attribute netsmtp sends is one Postfix sends, and the facts of the session agree."""
    from postfix import PrivatePostfix
    service = ScriptedService([])
    postfix = None
    try:
        postfix = PrivatePostfix(listen=True, extra=(
            "smtpd_recipient_restrictions = check_policy_service inet:%s, "
            "permit_mynetworks, reject_unauth_destination" % service.address))
        with smtplib.SMTP("127.0.0.1", postfix.port) as client:
            client.ehlo("client.test")
            client.mail("a@example.test")
            assert client.rcpt("u@example.test")[0] == 250
        wait_for(lambda: service.queries, what="Postfix's policy query")
        converse_with(tmp_path, spool, policy_services=service.address)(
            HELLO + [b"RCPT TO:<u@example.test>", b"QUIT"])
        wait_for(lambda: len(service.queries) == 2, what="netsmtp's policy query")
    finally:
        if postfix is not None:
            postfix.stop()
        service.close()
    theirs, ours = service.queries
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    for name in ("request", "protocol_state", "protocol_name", "helo_name", "sender",
                 "recipient", "recipient_count", "client_address", "sasl_username",
                 "encryption_protocol"):
        assert ours[name] == theirs[name], name


def test_sasl_attributes_after_auth(tmp_path, spool):
    """sasl_method and sasl_username name the AUTH mechanism and user."""
    import base64

    from netsmtp.auth import hash_password
    users = tmp_path / "users"
    users.write_text("ann:%s\n" % hash_password("secret"))
    service = ScriptedService([])
    try:
        converse = converse_with(tmp_path, spool, policy_services=service.address,
                                 auth_file=str(users), auth_plaintext=True)
        converse([b"EHLO client.test", b"AUTH PLAIN " + base64.b64encode(b"\0ann\0secret"),
                  *message_to("u@example.test")[1:]])
    finally:
        service.close()
    assert service.queries[0]["sasl_method"] == "PLAIN"
    assert service.queries[0]["sasl_username"] == "ann"
