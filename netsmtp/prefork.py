"""The prefork server: warm worker processes accept on one shared socket.

Forking a Python process per connection costs more than the session it
serves.  Postfix's master/smtpd and Apache's prefork MPM keep processes that
serve one connection after another; so does this.  The master never accepts:
it forks options.workers workers at start, forks more as soon as fewer than
SPARE_WORKERS are idle (up to options.max_sessions in all, so no client waits
behind a busy worker), retires idle ones the pool no longer needs, and
replaces any that exit or die.  With every one of options.max_sessions
workers busy, the master accepts what arrives and refuses it with a 421, so
no client waits unanswered in the listen backlog.  A worker reports busy/idle to the master over
a pipe (a worker that finds the next connection already queued takes it and
stays busy, with no report) and leaves after
options.max_connections_per_worker connections.

Each worker waits on the listening socket with epoll and EPOLLEXCLUSIVE, so a
new connection wakes one idle worker, not all of them, and a signal ends the
wait without racing an accept() that already took a connection.
"""

import errno
import logging
import os
import select
import signal
import struct
import time

from . import recipients
from .connection import Connection, Refuser, peer_of, serve
from .listener import open_listener
from .limits import GRACE, SessionTable, SharedLimits, rates_configured
from .server import stop_signals
from .session import Session

log = logging.getLogger(__name__)

SPARE_WORKERS = 2    # idle workers kept ready under load (at most options.workers)
SHRINK_AFTER = 10.0  # seconds of surplus before one idle worker is retired
RETIRE = signal.SIGUSR1  # to a worker: leave once the current session is done
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, RETIRE}
RESOURCE_PAUSE = 0.1  # seconds a worker waits after accept() ran out of fds or memory

# Worker -> master status: pid and state, one write under PIPE_BUF (atomic).
STATUS = struct.Struct("=iB")
IDLE, BUSY = 0, 1


class PreforkServer:
    """Listen on options.listen and serve connections with a pool of workers.

    serve() returns once SIGTERM or SIGINT stopped the pool and every worker
    has finished its current message.

    Class variables that may be overridden:
        spare_workers   idle workers kept ready while there is load
        shrink_after    seconds of surplus before an idle worker is retired
    """

    spare_workers = SPARE_WORKERS
    shrink_after = SHRINK_AFTER

    def __init__(self, options, spool, session_class=Session):
        self.options = options
        self.spool = spool
        self.session_class = session_class
        self.socket = open_listener(options.listen, options.backlog, options.listen_mode)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.refuser = Refuser(options, self.socket)
        # Never more workers than sessions allowed: each serves one at a time.
        self.limit = options.max_sessions or max(1, options.workers)
        self.size = min(max(1, options.workers), self.limit)
        self.table = SessionTable(options, self.limit)
        self.free_slots = list(range(self.limit - 1, -1, -1))
        self.slot_of = {}      # pid -> its slot in self.table
        self.admission = [self.table]
        if rates_configured(options):
            self.admission.append(SharedLimits(options, sessions=False))
        self.workers = {}      # pid -> monotonic time it was forked
        self.busy = set()
        self.retiring = set()
        self.stop_requested = False
        self.surplus_since = None
        self.hold_until = 0.0

    # -- the master ---------------------------------------------------------

    def serve(self):
        """Run the pool until SIGTERM or SIGINT, then wait for the workers."""
        self.status_read, self.status_write = os.pipe()
        os.set_blocking(self.status_read, False)
        pending = b""
        waiting_since = None  # when a connection began to wait with every worker busy
        try:
            with stop_signals(self) as wake:
                # A worker's exit wakes the loop too, through the same fd.
                signal.signal(signal.SIGCHLD, lambda signum, frame: None)
                while not self.stop_requested:
                    self.reap()
                    self.adjust()
                    watched, timeout = [self.status_read, wake], 1.0
                    if self.saturated() and waiting_since is None:
                        watched.append(self.socket)
                    elif self.saturated():
                        timeout = max(0.0, waiting_since + GRACE - time.monotonic())
                    ready, _, _ = select.select(watched, [], [], timeout)
                    if wake in ready:
                        os.read(wake, 512)
                    if self.status_read in ready:
                        pending = self.read_status(pending)
                    # A connection no worker can take waits GRACE seconds for
                    # one to finish its session, then the master refuses it.
                    if not self.saturated():
                        waiting_since = None
                    elif waiting_since is None:
                        if self.socket in ready:
                            waiting_since = time.monotonic()
                    elif time.monotonic() >= waiting_since + GRACE:
                        self.refuse_waiting()
                        waiting_since = None
        finally:
            self.stop()

    def stop(self):
        """Stop every worker gracefully and wait for them all."""
        log.info("stopping: %d worker(s), %d busy", len(self.workers), len(self.busy))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for pid in self.workers:
            self.signal(pid, signal.SIGTERM)
        self.socket.close()
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.forget(pid, status)
        os.close(self.status_read)
        os.close(self.status_write)
        log.info("stopped")

    def saturated(self):
        """True when every worker the pool may have is busy."""
        return len(self.workers) >= self.limit and len(self.busy) >= len(self.workers)

    def refuse_waiting(self):
        """Accept the connections no worker can take and refuse them with a 421."""
        for _ in range(self.options.backlog or 1):
            try:
                request, _ = self.socket.accept()
            except OSError:  # BlockingIOError: a worker took it, or none is left
                return
            self.refuser.refuse(request, "too many sessions")

    def read_status(self, pending):
        """Apply the workers' busy/idle reports; returns an unread remainder."""
        try:
            data = pending + os.read(self.status_read, STATUS.size * 512)
        except BlockingIOError:
            return pending
        whole = len(data) - len(data) % STATUS.size
        for pid, state in STATUS.iter_unpack(data[:whole]):
            if pid not in self.workers:
                continue
            if state == BUSY:
                self.busy.add(pid)
            else:
                self.busy.discard(pid)
        self.adjust()
        return data[whole:]

    def adjust(self):
        """Fork workers until enough are idle; retire one after a long surplus."""
        now = time.monotonic()
        spare = min(self.spare_workers, self.size)
        idle = len(self.workers) - len(self.busy) - len(self.retiring - self.busy)
        want = min(self.limit, max(self.size, len(self.busy) + spare))
        while len(self.workers) - len(self.retiring) < want and now >= self.hold_until:
            if len(self.workers) >= self.limit:
                break
            self.spawn()
            idle += 1
        if idle > spare and len(self.workers) - len(self.retiring) > self.size:
            if self.surplus_since is None:
                self.surplus_since = now
            elif now - self.surplus_since >= self.shrink_after:
                self.surplus_since = now
                idle_pids = set(self.workers) - self.busy - self.retiring
                pid = max(idle_pids)
                log.debug("retiring idle worker %d", pid)
                self.retiring.add(pid)
                self.signal(pid, RETIRE)
        else:
            self.surplus_since = None

    def reap(self):
        """Collect the workers that ended; a worker that fails at once holds spawning."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            started = self.workers.get(pid)
            self.forget(pid, status)
            if started is not None and os.waitstatus_to_exitcode(status) != 0:
                if time.monotonic() - started < 1.0:
                    # A worker that cannot even start would be forked in a
                    # tight loop; wait a second before trying again.
                    self.hold_until = time.monotonic() + 1.0

    def forget(self, pid, status):
        if self.workers.pop(pid, None) is None:
            return
        slot = self.slot_of.pop(pid)
        self.table.clear(slot)
        self.free_slots.append(slot)
        self.busy.discard(pid)
        self.retiring.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            log.warning("worker %d killed by signal %d", pid, -code)
        elif code != 0:
            log.warning("worker %d exited with status %d", pid, code)
        else:
            log.debug("worker %d exited", pid)

    @staticmethod
    def signal(pid, signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def spawn(self):
        recipients.refresh(self.options)  # the worker starts from the master's table
        # Until the worker has its own handlers, a SIGTERM would run the
        # master's copy in the child and be lost: hold signals over the fork.
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        slot = self.free_slots.pop()
        self.table.use(slot)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
            if pid == -1:
                self.free_slots.append(slot)
        if pid == 0:
            code = 1
            try:
                code = Worker(self).run()
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(code)
        self.workers[pid] = time.monotonic()
        self.slot_of[pid] = slot
        log.debug("worker %d started (%d in pool)", pid, len(self.workers))


class Worker:
    """One prefork worker: accept and serve connections one after another."""

    def __init__(self, server):
        self.server = server
        self.options = server.options
        self.spool = server.spool
        self.session_class = server.session_class
        self.socket = server.socket
        self.master = os.getppid()
        self.pid = os.getpid()
        self.reports = {state: STATUS.pack(self.pid, state) for state in (IDLE, BUSY)}
        self.session = None  # the Session being served, which stop signals reach
        self.stop_requested = False
        self.retiring = False
        self.served = 0

    def run(self):
        """Serve until stopped, retired or recycled; returns the exit code."""
        os.close(self.server.status_read)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.listen_to_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        poller = select.epoll()
        poller.register(self.socket.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        poller.register(wake_read, select.EPOLLIN)
        limit = self.options.max_connections_per_worker
        busy = False  # as last reported to the master
        try:
            while not (self.stop_requested or self.retiring):
                if not busy:
                    if not poller.poll(5.0) and os.getppid() != self.master:
                        log.warning("worker %d: master gone, leaving", self.pid)
                        break
                    try:
                        os.read(wake_read, 512)
                    except BlockingIOError:
                        pass
                    if self.stop_requested or self.retiring:
                        break
                # A busy worker tries the next queued connection before it
                # reports idle: under load it goes on serving with no
                # busy/idle pair for the master to wake up for.
                try:
                    request, client_address = self.socket.accept()
                except OSError as exc:
                    if busy:
                        self.report(IDLE)
                        busy = False
                    if isinstance(exc, (BlockingIOError, InterruptedError)):
                        continue  # none queued, or another worker took it
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue  # the client gave up before we accepted
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # The connection stays queued and epoll would report it
                        # again at once: pause instead of spinning on the error.
                        log.warning("worker %d: accept: %s", self.pid, exc)
                        time.sleep(RESOURCE_PAUSE)
                        continue
                    raise
                if not busy:
                    self.report(BUSY)
                    busy = True
                self.handle(request, client_address)
                self.served += 1
                if limit and self.served >= limit:
                    log.debug("worker %d: recycled after %d connections",
                              self.pid, self.served)
                    break
        finally:
            if busy:
                self.report(IDLE)
        return 0

    def listen_to_signals(self):
        """Install the worker's handlers, once: they outlive every connection.

        A stop also reaches the session being served (stop_gracefully), so
        no handler is swapped per connection; RETIRE waits for the session.
        """
        def stop(signum, frame):
            self.stop_requested = True
            if self.session is not None:
                self.session.stop_gracefully()

        def retire(signum, frame):
            self.retiring = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(RETIRE, retire)

    def handle(self, request, client_address):
        """Serve one connection (netsmtp.connection); errors end it, not the worker."""
        session = None
        try:
            connection = Connection.from_socket(request, self.options, peer=peer_of(client_address))
            session = serve(connection, self.options, self.spool, self.session_class,
                            self.server.admission, stop_requested=lambda: self.stop_requested,
                            signals_to=self.attach)
        except Exception:
            log.exception("error serving %s", client_address)
            request.close()
        finally:
            self.session = None
            if session is not None and session.stopping:
                self.stop_requested = True

    def attach(self, session):
        """From serve(): stop signals reach session from now on (listen_to_signals)."""
        self.session = session

    def report(self, state):
        os.write(self.server.status_write, self.reports[state])
