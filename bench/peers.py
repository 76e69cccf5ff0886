"""The servers under test, each started on a free loopback port.

Every peer but smtp-sink writes each message durably (fsync) before it says
250, so the figures compare like with like:

  postfix          a private Postfix instance (own config and queue
                   directories), queue fsync as always, delivery to discard
  aiosmtpd         aiosmtpd with a handler that writes and fsyncs a file
  smtp-sink        Postfix's protocol-only sink, no disk: the ceiling
  netsmtp-fork     netsmtp --workers 0: one forked child per connection
  netsmtp-stdin    netsmtp --stdin under tcpserver (ucspi-tcp)
  netsmtp-prefork  netsmtp --workers 4: the prefork pool
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOMAIN = "bench.test"
MAX_SIZE = 200_000_000  # room for the 100 MB message, dot-stuffing and headers


def free_port():
    """A port that was free a moment ago (for servers that cannot bind 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_banner(port, proc=None, timeout=20.0):
    """Wait until the server on port greets with 220: readiness, not a sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited with status %s" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("no 220 greeting on port %d" % port)


def process_tree(root):
    """root and all its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(b")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def tree_cpu_seconds(root, split=False):
    """User + system CPU of root and all its descendants, the reaped ones included.

    Each live process counts its own time and that of the children it has
    waited for (cutime, cstime), so a worker or smtpd that exited during a
    run is in its parent's figure.  split=True gives (user, system).
    """
    user = system = 0
    for pid in process_tree(root):
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    tick = os.sysconf("SC_CLK_TCK")
    return (user / tick, system / tick) if split else (user + system) / tick


def peak_rss_kb(pids):
    """The largest VmHWM (peak resident set, kB) among pids, and its pid."""
    best = (0, None)
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        best = max(best, (int(line.split()[1]), pid))
        except OSError:
            continue
    return best


def clear_directory(path):
    """Remove the files under path, keeping the directories."""
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


class Peer:
    """A server under test: start(workdir) -> port, stop(), root_pid."""

    name = "?"
    durable = True
    store = None  # directory whose files are the stored messages, if any
    connection_share = 1.0  # of the one-message-per-connection loads' count

    def __init__(self):
        self.proc = None
        self.port = None

    @property
    def root_pid(self):
        return self.proc.pid

    def command(self, workdir):
        raise NotImplementedError

    def start(self, workdir):
        self.port = free_port()
        self.log = open(os.path.join(workdir, self.name + ".log"), "ab")
        self.proc = subprocess.Popen(self.command(workdir), cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_banner(self.port, self.proc)
        return self.port

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def stored(self):
        """How many messages the peer holds on disk (None if it does not keep them)."""
        if self.store is None:
            return None
        return sum(len([f for f in files if f.endswith(".msg")])
                   for folder, _, files in os.walk(self.store)
                   if os.path.basename(folder) != "tmp")

    def forget_messages(self):
        if self.store is not None:
            clear_directory(self.store)

    def settle(self):
        """Wait until the peer has finished the work the messages sent so far gave it."""
        time.sleep(0.1)  # the last sessions' processes exit (and are reaped) after QUIT


class Netsmtp(Peer):
    """python -m netsmtp with the real interpreter (never a shim: 80 ms a start)."""

    workers = 4

    def __init__(self, name, workers):
        super().__init__()
        self.name, self.workers = name, workers

    def netsmtp_args(self, workdir):
        self.store = os.path.join(workdir, self.name + "-spool")
        return ["--spool", self.store, "--hostname", "mx." + DOMAIN,
                "--local-domains", DOMAIN, "--max-size", str(MAX_SIZE),
                "--max-sessions", "200", "--backlog", "512",
                # smtp-source -d sends all messages over a few connections:
                "--max-messages", "0", "--max-session-recipients", "0"]

    def command(self, workdir):
        return [sys.executable, "-m", "netsmtp", "--listen", "127.0.0.1:%d" % self.port,
                "--workers", str(self.workers), *self.netsmtp_args(workdir)]


class NetsmtpStdin(Netsmtp):
    """netsmtp --stdin, one process per connection, started by tcpserver."""

    connection_share = 0.2

    def __init__(self):
        super().__init__("netsmtp-stdin", 0)

    def netsmtp_args(self, workdir):
        # tcpserver's -c and -b are the limits here, as inetd's are: a --max-sessions
        # of netsmtp's own would count sessions in a file under a lock (netsmtp.limits).
        args = super().netsmtp_args(workdir)
        for flag in ("--max-sessions", "--backlog"):
            index = args.index(flag)
            del args[index:index + 2]
        return args

    def command(self, workdir):
        # -R -H -l0: no ident, reverse DNS or local name lookups per connection.
        return [shutil.which("tcpserver"), "-R", "-H", "-l0", "-c", "200", "-b", "512",
                "127.0.0.1", str(self.port),
                sys.executable, "-m", "netsmtp", "--stdin", *self.netsmtp_args(workdir)]

    def children_cpu_seconds(self):
        """CPU of the sessions tcpserver has reaped (its cutime + cstime)."""
        with open("/proc/%d/stat" % self.proc.pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


class Aiosmtpd(Peer):
    name = "aiosmtpd"

    def command(self, workdir):
        self.store = os.path.join(workdir, "aiosmtpd-store")
        os.makedirs(self.store, exist_ok=True)
        return [sys.executable, os.path.join(HERE, "aiosmtpd_peer.py"),
                "127.0.0.1", str(self.port), self.store, str(MAX_SIZE)]


class SmtpSink(Peer):
    name = "smtp-sink"
    durable = False

    def command(self, workdir):
        user = [] if os.getuid() else ["-u", "postfix"]
        return [tool("smtp-sink"), *user, "127.0.0.1:%d" % self.port, "1024"]


class Postfix(Peer):
    """A private Postfix: its own config_directory and queue_directory.

    smtpd on 127.0.0.1:PORT accepts mail for bench.test from loopback; the
    cleanup daemon fsyncs each queue file before smtpd says 250 (Postfix's
    normal durability), and the queue manager hands it to the discard
    transport, which removes it.
    """

    name = "postfix"

    MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{domain}
mydomain = {domain}
myorigin = $mydomain
mydestination =
relay_domains = {domain}
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard
relay_transport = discard
local_transport = discard
alias_maps =
alias_database =
message_size_limit = {max_size}
mailbox_size_limit = 0
smtpd_banner = $myhostname ESMTP
biff = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
"""

    MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
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
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

    def start(self, workdir):
        self.port = free_port()
        self.dir = os.path.join(workdir, "postfix")
        self.config = os.path.join(self.dir, "etc")
        os.makedirs(self.config, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "queue"), exist_ok=True)
        postfix_uid = pwd.getpwnam("postfix").pw_uid
        os.chown(os.path.join(self.dir, "data"), postfix_uid, -1)
        values = dict(dir=self.dir, domain=DOMAIN, max_size=MAX_SIZE, port=self.port)
        with open(os.path.join(self.config, "main.cf"), "w") as f:
            f.write(self.MAIN_CF.format(**values))
        with open(os.path.join(self.config, "master.cf"), "w") as f:
            f.write(self.MASTER_CF.format(**values))
        os.chmod(self.dir, 0o755)
        self.postfix("start")
        deadline = time.monotonic() + 20
        pid_file = os.path.join(self.dir, "queue", "pid", "master.pid")
        while not os.path.exists(pid_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(pid_file) as f:
            self.master_pid = int(f.read().split()[0])
        wait_for_banner(self.port)
        return self.port

    @property
    def root_pid(self):
        return self.master_pid

    def postfix(self, *args):
        result = subprocess.run([tool("postfix"), "-c", self.config, *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            # Postfix logs its reasons to maillog_file, not to a stderr that is no tty.
            try:
                with open(os.path.join(self.dir, "maillog")) as f:
                    reason = f.read()[-500:]
            except OSError:
                reason = result.stderr
            raise RuntimeError("postfix %s failed: %s" % (" ".join(args), reason.strip()))

    def stop(self):
        try:
            self.postfix("stop")
        except RuntimeError:
            self.postfix("abort")
        deadline = time.monotonic() + 20
        while os.path.exists("/proc/%d" % self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)

    def forget_messages(self):
        pass

    def settle(self):
        """Wait (at most 30 s) until qmgr has handed every message to discard."""
        queue = os.path.join(self.dir, "queue")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                files for folder in ("maildrop", "incoming", "active")
                for _, _, files in os.walk(os.path.join(queue, folder))):
            time.sleep(0.05)
        super().settle()


def tool(name):
    """The path of a Postfix tool, which may live in /usr/sbin outside PATH."""
    return shutil.which(name) or next(
        (path for path in ("/usr/sbin/" + name, "/usr/lib/postfix/sbin/" + name)
         if os.path.exists(path)), name)


PEERS = {
    "postfix": Postfix,
    "aiosmtpd": Aiosmtpd,
    "smtp-sink": SmtpSink,
    "netsmtp-fork": lambda: Netsmtp("netsmtp-fork", 0),
    "netsmtp-stdin": NetsmtpStdin,
    "netsmtp-prefork": lambda: Netsmtp("netsmtp-prefork", 4),
}
