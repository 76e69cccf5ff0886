"""The stdin mode: through a pipe, over a socket on fd 0, and under xinetd."""

import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port, need_tool, only_entry, replies_of, wait_for

SESSION = (b"EHLO pipe.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
           b"Subject: piped\r\n\r\nhello\r\n.\r\nQUIT\r\n")


def stdin_mode(spool, data, env=None, args=()):
    """Run `python -m netsmtp --stdin` on a pipe; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", spool, "--hostname", "mx.test",
         "--local-domains", "mx.test", *args],
        input=data, capture_output=True, cwd=ROOT, timeout=30,
        env={**os.environ, **(env or {})})


def test_piped_session(tmp_path):
    """A piped session queues the message; stdout holds replies only, logs go to stderr."""
    spool = str(tmp_path / "spool")
    result = stdin_mode(spool, SESSION)
    assert result.returncode == 0
    assert [code for code, _ in replies_of(result.stdout)] == [220, 250, 250, 250, 354, 250, 221]
    assert b"queued id=" in result.stderr
    envelope, message = only_entry(spool)
    assert envelope.client is None and b"(local)" in message


def test_superserver_environment_names_the_client(tmp_path):
    """On a pipe, TCPREMOTEIP (tcpserver) names the client; it is then not trusted to relay."""
    spool = str(tmp_path / "spool")
    data = SESSION.replace(b"RCPT TO:<u@mx.test>", b"RCPT TO:<u@mx.test>\r\nRCPT TO:<x@far.test>")
    result = stdin_mode(spool, data, env={"TCPREMOTEIP": "192.0.2.9"})
    codes = [code for code, _ in replies_of(result.stdout)]
    assert codes == [220, 250, 250, 250, 550, 354, 250, 221]
    envelope, message = only_entry(spool)
    assert envelope.client == "192.0.2.9" and b"([192.0.2.9])" in message


def test_remote_host_from_xinetd_environment(tmp_path):
    """REMOTE_HOST (xinetd) is the fallback when TCPREMOTEIP is absent."""
    spool = str(tmp_path / "spool")
    stdin_mode(spool, SESSION, env={"REMOTE_HOST": "198.51.100.4"})
    assert only_entry(spool)[0].client == "198.51.100.4"


def test_socket_on_fd0_gives_the_peer_address(tmp_path):
    """When fd 0 is a TCP socket (inetd, systemd Accept=yes) its peer is the client."""
    spool = str(tmp_path / "spool")
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", spool, "--hostname", "mx.test"],
        stdin=accepted, stdout=accepted, stderr=subprocess.PIPE, cwd=ROOT)
    accepted.close()
    client.sendall(SESSION)
    data = b""
    while not data.endswith(b"221 2.0.0 mx.test closing connection\r\n"):
        chunk = client.recv(65536)
        assert chunk, data
        data += chunk
    assert proc.wait(20) == 0
    client.close()
    listener.close()
    assert only_entry(spool)[0].client == "127.0.0.1"


def test_idle_timeout_on_a_pipe(tmp_path):
    """A pipe has no socket timeout; the stdin mode still closes an idle session with 421."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", str(tmp_path / "s"),
         "--hostname", "mx.test", "--timeout", "0.5"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdin.write(b"EHLO c.test\r\n")
    proc.stdin.flush()
    lines = [proc.stdout.readline()]
    while lines[-1] and not lines[-1].startswith(b"421"):
        lines.append(proc.stdout.readline())
    assert lines[-1].startswith(b"421 4.4.2 ")
    assert proc.wait(20) == 0
    proc.stdin.close()
    proc.stdout.close()
    proc.stderr.close()


def test_client_that_stops_reading_a_pipe_times_out(tmp_path):
    """Replies nobody reads fill the pipe; the write times out and the session ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", str(tmp_path / "s"),
         "--hostname", "mx.test", "--timeout", "0.5", "--max-bad-commands", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    def feed():
        try:
            proc.stdin.write(b"NOOP\r\n" * 40000)
        except BrokenPipeError:
            pass  # the server has gone, as it should
    threading.Thread(target=feed, daemon=True).start()
    try:
        assert proc.wait(30) == 0  # stdout is never read
    finally:
        proc.kill()
    assert b"timeout" in proc.stderr.read()


def test_stdin_mode_imports_only_what_a_session_needs(tmp_path):
    """No ssl, email, smtplib, tomllib or socketserver in a plain piped session."""
    code = ("import sys; from netsmtp.cli import main; main(sys.argv[1:]); "
            "open(%r, 'w').write(' '.join(sorted(sys.modules)))" % str(tmp_path / "mods"))
    subprocess.run([sys.executable, "-c", code, "--stdin", "--spool", str(tmp_path / "s"),
                    "--hostname", "mx.test"], input=SESSION, capture_output=True, cwd=ROOT,
                   timeout=30, check=True)
    modules = set((tmp_path / "mods").read_text().split())
    assert "netsmtp.session" in modules
    for heavy in ("ssl", "email", "smtplib", "tomllib", "socketserver", "filelock"):
        assert heavy not in modules, heavy


def test_unwritable_spool_in_stdin_mode(tmp_path):
    """With an unusable spool the stdin mode refuses at once with 421, exit 1."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = stdin_mode(str(blocker / "spool"), SESSION)
    assert result.returncode == 1
    assert result.stdout.startswith(b"421 ")


# -- xinetd, with the service entry from the README ---------------------------------

def readme_block(kind):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.search(r"```%s\n(.*?)```" % kind, text, re.S).group(1)


def xinetd_config(tmp_path, port, spool):
    """The README's entry, pointed at this checkout, a test spool and a free port."""
    entry = readme_block("xinetd")
    settings = dict(re.findall(r"^\s*(\w+)\s*\+?=\s*(.*?)\s*$", entry, re.M))
    assert settings["server_args"].startswith("-m netsmtp --stdin")
    settings.update(type="UNLISTED", port=str(port), bind="127.0.0.1", server=sys.executable,
                    server_args=re.sub(r"--spool \S+", "--spool " + spool,
                                       settings["server_args"]).replace("mx.example.com", "mx.test"),
                    env="PYTHONPATH=%s" % ROOT, log_type="FILE %s" % (tmp_path / "xinetd.log"))
    settings.pop("log_on_failure", None)
    if os.getuid() != 0:
        settings.pop("user", None)
    elif "user" in settings:
        settings["user"] = "root"
    body = "\n".join("    %s = %s" % item for item in settings.items())
    return "service netsmtp-test\n{\n%s\n}\n" % body


def test_under_xinetd(tmp_path):
    """xinetd runs the README's service entry; smtplib sends through it."""
    import smtplib
    xinetd = need_tool("xinetd")
    spool = str(tmp_path / "spool")
    for _attempt in range(5):
        port = free_port()
        conf = tmp_path / "xinetd.conf"
        conf.write_text(xinetd_config(tmp_path, port, spool))
        proc = subprocess.Popen([xinetd, "-dontfork", "-f", str(conf), "-pidfile",
                                 str(tmp_path / "pid")], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            if proc.poll() is not None:
                continue  # the port was taken meanwhile: try another
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.sendmail("a@client.test", ["u@mx.test"], b"Subject: xinetd\r\n\r\nhi\r\n")
            envelope, message = only_entry(spool)
            assert envelope.client == "127.0.0.1" and b"Subject: xinetd" in message
            return
        finally:
            proc.terminate()
            proc.wait(10)
    pytest.fail("xinetd did not start: %s" % proc.stderr.read().decode())


RELAY_ATTEMPT = (b"EHLO evil.example\r\nMAIL FROM:<spam@evil.example>\r\n"
                 b"RCPT TO:<victim@elsewhere.example>\r\nQUIT\r\n")


def over_socketpair(spool, data, env=None, args=()):
    """--stdin on an AF_UNIX socketpair, as socat EXEC: and stunnel exec = hand it over.

    Returns (the client's view of the replies, netsmtp's stderr)."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", spool, "--hostname", "mx.test",
         "--local-domains", "mx.test", *args],
        stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, cwd=ROOT,
        env={k: v for k, v in {**os.environ, **(env or {})}.items()
             if k not in ("TCPREMOTEIP", "REMOTE_HOST", "SOCAT_PEERADDR") or k in (env or {})})
    theirs.close()
    ours.sendall(data)
    ours.shutdown(socket.SHUT_WR)
    ours.settimeout(30)
    received = b"".join(iter(lambda: ours.recv(4096), b""))
    ours.close()
    stderr = proc.stderr.read().decode()
    proc.wait(30)
    return replies_of(received), stderr


@pytest.mark.parametrize("env", [{}, {"REMOTE_HOST": "203.0.113.7"},
                                 {"TCPREMOTEIP": "203.0.113.7"}, {"SOCAT_PEERADDR": "203.0.113.7"}],
                         ids=["no-address", "stunnel", "tcpserver", "socat"])
def test_unix_socket_on_fd0_is_no_open_relay(tmp_path, env):
    """An AF_UNIX socketpair on fd 0 with or without an address in the environment may
    not relay: the address is taken from the environment, and no address is no trust."""
    replies, stderr = over_socketpair(str(tmp_path / "spool"), RELAY_ATTEMPT, env)
    assert [code for code, _ in replies] == [220, 250, 250, 550, 221]
    assert replies[3][1] == ["550 5.7.1 Relaying denied for <victim@elsewhere.example>"]
    if env:
        [(name, value)] = env.items()
        assert "203.0.113.7: client address from %s" % name in stderr
    else:
        assert "no client address" in stderr


def test_addresses_in_the_environment_in_order(tmp_path):
    """TCPREMOTEIP before REMOTE_HOST before SOCAT_PEERADDR; a value that is no IP
    address is skipped with a warning."""
    spool = str(tmp_path / "spool")
    result = stdin_mode(spool, SESSION, env={"TCPREMOTEIP": "not-an-ip", "REMOTE_HOST": "",
                                            "SOCAT_PEERADDR": "[2001:db8::5]"})
    assert only_entry(spool)[0].client == "2001:db8::5"
    assert b"ignoring TCPREMOTEIP=not-an-ip" in result.stderr


def test_local_sessions_relay_only_when_listed(tmp_path):
    """--relay-networks local trusts a session with no client address; nothing else does."""
    replies, _ = over_socketpair(str(tmp_path / "spool"), RELAY_ATTEMPT,
                                 args=["--relay-networks", "local"])
    assert [code for code, _ in replies] == [220, 250, 250, 250, 221]
    replies, _ = over_socketpair(str(tmp_path / "spool"), RELAY_ATTEMPT,
                                 env={"REMOTE_HOST": "203.0.113.7"},
                                 args=["--relay-networks", "local"])
    assert [code for code, _ in replies] == [220, 250, 250, 550, 221]


def test_socat_exec_front_end_is_no_open_relay(tmp_path):
    """A real socat TCP-LISTEN ... EXEC:netsmtp front end (a socketpair on fd 0 and
    SOCAT_PEERADDR): a client on 127.0.0.1 counts as 127.0.0.1, one step from the
    relay networks, so with --relay-networks none it may not relay."""
    socat = need_tool("socat")
    port = free_port()
    command = "%s -m netsmtp --stdin --spool %s --hostname mx.test --local-domains mx.test " \
              "--relay-networks none" % (sys.executable, tmp_path / "spool")
    proc = subprocess.Popen([socat, "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr" % port,
                             "EXEC:%s" % command], cwd=ROOT, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)})
    try:
        def connected():
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=20)
            except ConnectionRefusedError:
                return None
        client = wait_for(connected, what="socat to listen")
        client.sendall(RELAY_ATTEMPT)
        received = b"".join(iter(lambda: client.recv(4096), b""))
        client.close()
    finally:
        proc.wait(30)
    assert [code for code, _ in replies_of(received)] == [220, 250, 250, 550, 221]
    assert b"127.0.0.1: client address from SOCAT_PEERADDR" in proc.stderr.read()
