"""The pytest plugin's fixtures, run in a pytest of their own by pytester."""

import importlib.metadata
import os
import re

from conftest import ROOT

pytest_plugins = ["pytester"]

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def plugin_args():
    """Load the plugin by its entry point; by name where the install predates it."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="pytest11")]
    return [] if "netsmtp" in names else ["-p", "netsmtp.pytest_plugin"]


def run(pytester, source):
    pytester.makepyfile(source)
    return pytester.runpytest(*plugin_args(), "-q", "-p", "no:cacheprovider")


def test_entry_point_is_declared():
    """setup.py registers the plugin under pytest11, so installing netsmtp is enough."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert '"pytest11": ["netsmtp = netsmtp.pytest_plugin"]' in f.read()


def test_readme_example_passes(pytester):
    """The README's example test of an application that sends mail passes as written."""
    example = re.search(r"```python\n(# test_signup\.py.*?)```", README, re.S).group(1)
    result = run(pytester, example)
    result.assert_outcomes(passed=1)


def test_smtp_server_fixture(pytester):
    """host, port, messages with their envelope, wait_for(), clear()."""
    result = run(pytester, '''
        import email.message, smtplib

        def test_it(smtp_server):
            assert smtp_server.host == "127.0.0.1" and smtp_server.port > 0
            assert smtp_server.messages == []
            with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
                client.sendmail("app@example.com", ["ann@example.org", "bob@example.net"],
                                b"Subject: one\\r\\n\\r\\nbody one\\r\\n")
                client.sendmail("<>", ["carol@example.org"], b"Subject: two\\r\\n\\r\\nx\\r\\n")
            first, second = smtp_server.wait_for(2)
            assert isinstance(first, email.message.EmailMessage)
            assert first["Subject"] == "one" and first.get_content() == "body one\\n"
            assert first.envelope.sender == "app@example.com"
            assert first.envelope.recipients == ["ann@example.org", "bob@example.net"]
            assert first.envelope.client == "127.0.0.1"
            assert second["Subject"] == "two" and second.envelope.sender == ""
            smtp_server.clear()
            assert smtp_server.messages == []
    ''')
    result.assert_outcomes(passed=1)


def test_wait_for_raises_timeout_error(pytester):
    """Fewer messages than asked for within the timeout is a TimeoutError."""
    result = run(pytester, '''
        import smtplib, pytest

        def test_it(smtp_server):
            with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
                client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
            with pytest.raises(TimeoutError):
                smtp_server.wait_for(2, timeout=0.2)
            assert len(smtp_server.wait_for(1)) == 1
    ''')
    result.assert_outcomes(passed=1)


def test_make_smtp_server_options_and_refused_recipients(pytester):
    """Options keywords apply (max_size) and refuse_recipients get 550 5.1.1."""
    result = run(pytester, '''
        import smtplib, pytest

        def test_it(make_smtp_server):
            server = make_smtp_server(max_size=1000, refuse_recipients=["Gone@example.com"])
            with smtplib.SMTP(server.host, server.port) as client:
                client.ehlo()
                assert client.esmtp_features["size"] == "1000"
                refused = client.sendmail("a@example.com", ["gone@example.com", "ok@example.com"],
                                          b"Subject: x\\r\\n\\r\\nx\\r\\n")
                assert refused == {"gone@example.com": (550, b"5.1.1 Mailbox <gone@example.com> unavailable")}
                with pytest.raises(smtplib.SMTPSenderRefused) as too_big:
                    client.sendmail("a@example.com", ["ok@example.com"], b"x" * 900 + b"\\r\\n" + b"y" * 900)
                assert too_big.value.smtp_code == 552
            [message] = server.wait_for(1)
            assert message.envelope.recipients == ["ok@example.com"]
    ''')
    result.assert_outcomes(passed=1)


def test_servers_stop_after_the_test(pytester):
    """Each test gets its own server and spool; after the test nothing listens."""
    result = run(pytester, '''
        import socket, pytest
        ports = []

        def test_first(smtp_server):
            ports.append(smtp_server.port)

        def test_second(smtp_server):
            assert smtp_server.messages == []
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", ports[0]), timeout=5)
    ''')
    result.assert_outcomes(passed=2)


def test_no_session_thread_outlives_its_server(pytester):
    """A client still connected at the end (or just gone after QUIT) leaves no thread
    behind: stop() ends each session and waits for it."""
    result = run(pytester, '''
        import smtplib, threading
        BEFORE = set(threading.enumerate())
        clients = []

        def test_first(smtp_server):
            with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
                client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
            idle = smtplib.SMTP(smtp_server.host, smtp_server.port)
            idle.ehlo()
            clients.append(idle)  # still connected when the test ends

        def test_second():
            assert set(threading.enumerate()) <= BEFORE
    ''')
    result.assert_outcomes(passed=2)


def test_make_smtp_server_with_tls_and_auth(pytester, tls_files, tmp_path):
    """tls_cert/tls_key and auth_file pass through: STARTTLS, then AUTH, then a message."""
    from netsmtp.auth import hash_password
    ca, cert, key = tls_files
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    users = tmp_path / "users"
    users.write_text("ann:%s\n" % hash_password("secret"))
    result = run(pytester, '''
        import smtplib, ssl

        def test_it(make_smtp_server):
            server = make_smtp_server(tls_cert=%r, tls_key=%r, auth_file=%r)
            context = ssl.create_default_context(cafile=%r)
            with smtplib.SMTP(server.host, server.port) as client:
                client.starttls(context=context)
                client.login("ann", "secret")
                client.sendmail("ann@example.com", ["b@example.org"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
            [message] = server.wait_for(1)
            assert message.envelope.auth == "ann"
    ''' % (cert, key, str(users), str(tmp_path / "ca.pem")))
    result.assert_outcomes(passed=1)
