"""A private Postfix instance for tests, started as bench/peers.py starts one.

Its own config and queue directories under a temporary folder; smtpd on a
free loopback port when asked, and an smtp client relaying everything to a
relayhost when one is given.  The caller stops it.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest
from conftest import IN_CI, free_port, need_tool, wait_for

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = {hostname}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {relay_domains}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
smtp_tls_security_level = none
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
biff = no
{extra}
"""

MASTER_CF = """\
pickup    unix n - n 1 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 1 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
smtp      unix - - n - - smtp
lmtp      unix - - n - - lmtp
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """postfix -c DIR: .port (smtpd, if listen), .sendmail(args, message), .stop()."""

    def __init__(self, listen=False, relayhost=None, hostname="client.test",
                 relay_domains="", extra=""):
        self.postfix_path = need_tool("postfix")
        if os.geteuid() != 0:
            reason = "a private Postfix needs root (postfix start, the postfix user's data dir)"
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        # Not under pytest's tmp_path: its 0700 parents keep the postfix user out.
        self.dir = tempfile.mkdtemp(prefix="netsmtp-postfix-")
        self.config = os.path.join(self.dir, "etc")
        for folder in ("etc", "data", "queue"):
            os.makedirs(os.path.join(self.dir, folder), exist_ok=True)
        os.chown(os.path.join(self.dir, "data"), pwd.getpwnam("postfix").pw_uid, -1)
        os.chmod(self.dir, 0o755)
        if relayhost:
            extra += "\nrelayhost = [%s]:%d\ndefault_transport = smtp\nrelay_transport = smtp\n" % (
                relayhost)
        else:
            extra += "\ndefault_transport = discard\nrelay_transport = discard\n"
        master = MASTER_CF
        self.port = None
        if listen:
            self.port = free_port()
            master = "127.0.0.1:%d inet n - n - - smtpd\n" % self.port + master
        with open(os.path.join(self.config, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(dir=self.dir, hostname=hostname,
                                   relay_domains=relay_domains, extra=extra))
        with open(os.path.join(self.config, "master.cf"), "w") as f:
            f.write(master)
        self.run("start")
        pid_file = os.path.join(self.dir, "queue", "pid", "master.pid")
        wait_for(lambda: os.path.exists(pid_file), what="the Postfix master")
        with open(pid_file) as f:
            self.master_pid = int(f.read().split()[0])
        if listen:
            import socket

            def greets():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                        return s.recv(512).startswith(b"220")
                except OSError:
                    return False
            wait_for(greets, what="Postfix smtpd's 220")

    def run(self, *args):
        result = subprocess.run([self.postfix_path, "-c", self.config, *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError("postfix %s failed: %s %s" % (" ".join(args), result.stderr,
                                                             self.log()[-500:]))

    def sendmail(self, args, message):
        """Postfix's sendmail(1) with this instance's config; returns its exit code."""
        path = need_tool("sendmail")
        return subprocess.run([path, "-C", self.config, *args], input=message,
                              capture_output=True, timeout=30).returncode

    def log(self):
        try:
            with open(os.path.join(self.dir, "maillog")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        try:
            self.run("stop")
        except RuntimeError:
            self.run("abort")
        deadline = time.monotonic() + 20
        while os.path.exists("/proc/%d" % self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # postfix stop returns before the master has gone
        shutil.rmtree(self.dir, ignore_errors=True)
