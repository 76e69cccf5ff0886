"""Command-line front ends: parse options, set up logging, run, return an exit code.

`netsmtp --stdin` starts once per connection under inetd, so the daemon's
flags are read by quick_flags(), a few lines built from the same table as
the argparse parser (netsmtp.options.SPEC); anything it does not take for
certain (--help, an abbreviation, a value that looks like a flag) goes to
argparse, which is imported only then.  The daemon's other modes read them
the same way: argparse would otherwise stay in the memory of every prefork
worker.
"""

import logging
import os
import sys

from . import __version__
from .options import DAEMON, SPEC, OptionError, Options, load_toml, options_of, parse_bool

EX_USAGE = 2
EX_TEMPFAIL = 75

log = logging.getLogger(__name__)


def make_parser(prog, description=None):
    """An argparse parser whose errors are one line on stderr and exit code 2.

    argparse is imported here, not at the top: a --stdin start needs none.
    """
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EX_USAGE, "%s: error: %s\n" % (self.prog, message))
    return Parser(prog=prog, description=description)


class QuickParser:
    """What options_from() and main() need of a parser, for flags quick_flags() read."""

    def __init__(self, prog):
        self.prog = prog

    def error(self, message):
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        raise SystemExit(EX_USAGE)


def quick_flags(argv, names):
    """The flags of a plain start as a namespace, or None to leave them to argparse.

    Takes exactly what the argparse parser of add_options(names) takes in
    the common forms: "--flag VALUE", "--flag=VALUE", "--bool" and
    "--no-bool", repeatable flags, "--config FILE".  Anything else (an
    unknown or abbreviated flag, a value that looks like a flag, a word
    that is no flag) returns None, and argparse parses argv as always,
    errors and all.
    """
    import types
    flags = {"--config": None}
    for name in names:
        opt = SPEC[name]
        flags[opt.flag] = opt
        if opt.parse is parse_bool:
            flags["--no-" + opt.flag[2:]] = opt
    values = {"config": None}
    args = iter(argv)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag not in flags:
            return None
        opt = flags[flag]
        if opt is not None and opt.parse is parse_bool:
            if equals:
                return None
            values[opt.name] = not flag.startswith("--no-")
            continue
        if not equals:
            value = next(args, None)
            if value is None or value.startswith("-"):
                return None
        if opt is None:
            values["config"] = value
        elif opt.each:
            values.setdefault(opt.name, []).append(value)
        else:
            values[opt.name] = value
    return types.SimpleNamespace(**values)


def add_options(parser, names):
    """Add a flag for each named option of SPEC, and --config."""
    import argparse
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file whose keys are these options' names; keys of the "
                        "other netsmtp programs are accepted too")
    for name in names:
        opt = SPEC[name]
        if opt.parse is parse_bool:
            parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction,
                                default=None, help=opt.help)
        elif opt.each:
            parser.add_argument(opt.flag, dest=name, action="append", metavar="ADDR",
                                default=None, help=opt.help)
        else:
            default = "" if opt.default is None else " (default: %s)" % (opt.default,)
            parser.add_argument(opt.flag, metavar=name.split("_")[-1].upper(),
                                default=None, help=opt.help + default)


def options_from(parser, args):
    """Options from the config file, overridden by the flags given.

    The file may hold any option of SPEC, so one file serves every program.
    """
    try:
        values = load_toml(args.config) if args.config else {}
        values.update((name, getattr(args, name)) for name in SPEC
                      if getattr(args, name, None) is not None)
        return Options(**values)
    except OptionError as exc:
        parser.error(str(exc))


def same_file(fd_a, fd_b):
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class SyslogHandler(logging.Handler):
    """Records as datagrams to the local syslog socket, facility mail (RFC 3164 priority).

    What logging.handlers.SysLogHandler sends to /dev/log, without importing
    logging.handlers: it brings pickle and queue, 3 to 4 ms of every start
    under inetd, where the logs go to syslog (bench/README.md).
    """

    MAIL = 2  # facility
    SEVERITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, address):
        super().__init__()
        self.address = address
        self.socket = self.connect()

    def connect(self):
        import socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def emit(self, record):
        try:
            priority = self.MAIL * 8 + self.SEVERITIES.get(record.levelname, 4)
            data = ("<%d>%s\0" % (priority, self.format(record))).encode("utf-8", "replace")
            try:
                self.socket.send(data)
            except OSError:  # syslog restarted: once more on a new socket
                self.socket.close()
                self.socket = self.connect()
                self.socket.send(data)
        except Exception:
            self.handleError(record)

    def close(self):
        self.socket.close()
        super().close()


def syslog_handler(address="/dev/log"):
    """A handler for the local syslog (facility mail), or None without one."""
    if not os.path.exists(address):
        return None
    try:
        handler = SyslogHandler(address)
    except OSError:  # not a datagram socket: the standard handler knows the other kinds
        from logging.handlers import SysLogHandler
        handler = SysLogHandler(address, facility=SysLogHandler.LOG_MAIL)
    handler.setFormatter(logging.Formatter("netsmtp[%(process)d]: %(message)s"))
    return handler


def setup_logging(options, protocol_on_stdio=False):
    """Log to stderr, or to syslog when asked or when stderr is the client.

    inetd and xinetd hand the connection over as fds 0, 1 and 2; a log line
    on stderr would then reach the client, so it goes to syslog (or nowhere),
    and neither logging nor Python may print its own errors there either.
    """
    stderr_is_client = protocol_on_stdio and (same_file(0, 2) or same_file(1, 2))
    if stderr_is_client:
        logging.raiseExceptions = False
        # Nor may Python print a traceback there: the client would read it.
        sys.stderr = open(os.devnull, "w")
    handler = None
    if options.syslog or stderr_is_client:
        handler = syslog_handler()
    if handler is None:
        if stderr_is_client:
            handler = logging.NullHandler()
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(
                "%(asctime)s netsmtp[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("netsmtp")
    root.setLevel(options.log_level)
    root.handlers[:] = [handler]
    root.propagate = False
    # Each record would look up its caller's frame and thread, which no
    # format here shows: the Logging HOWTO's "Optimization" settings.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def warn_about_secrets(options):
    """A warning at start for each password file that group or others can read."""
    if options.auth_file or options.smarthost_password_file:
        from .auth import warn_if_readable
        if options.auth_file:
            warn_if_readable(options.auth_file, "--auth-file")
        if options.smarthost_password_file:
            warn_if_readable(options.smarthost_password_file, "--smarthost-password-file")


def daemon_parser():
    parser = make_parser(DAEMON, "A small, durable SMTP server.")
    add_options(parser, options_of(DAEMON))
    parser.add_argument("--version", action="version", version="netsmtp " + __version__)
    parser.add_argument("--check-recipient", metavar="ADDRESS",
                        help="print what ADDRESS resolves to (mailbox, alias targets, or "
                             "refused and why) and exit: 0 accepted, 1 refused")
    return parser


def main(argv=None):
    """netsmtp: the SMTP daemon (the prefork or forking server, or one session on stdin)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = quick_flags(argv, options_of(DAEMON))
    if args is not None:
        parser = QuickParser(DAEMON)
        args.check_recipient = None
    else:
        parser = daemon_parser()
        args = parser.parse_args(argv)
    options = options_from(parser, args)
    if options.tls_on_connect and not options.tls_cert:
        parser.error("--tls-on-connect needs --tls-cert")
    if options.require_auth and not options.auth_file:
        parser.error("--require-auth needs --auth-file")
    if options.sink and options.stdin:
        parser.error("--sink cannot be used with --stdin: stdout is the SMTP session there")
    if options.verify_recipients and not options.smarthost:
        parser.error("--verify-recipients needs --smarthost")
    if options.lmtp and isinstance(options.listen, tuple) and options.listen[1] == 25:
        # RFC 2033 section 5: LMTP must not be used on the SMTP port.
        parser.error("--lmtp cannot listen on port 25 (RFC 2033 section 5)")
    setup_logging(options, protocol_on_stdio=options.stdin)
    warn_about_secrets(options)
    if options.sink:
        return sink_main(options)

    if options.recipients:
        from .recipients import TableError, current
        try:
            table = current(options)
        except TableError as exc:
            if options.stdin:
                log.error("%s", exc)
                from .replies import format_reply
                sys.stdout.buffer.write(format_reply("421 4.3.0", options.hostname))
                sys.stdout.buffer.flush()
            else:
                print("netsmtp: error: %s" % exc, file=sys.stderr)
            return EX_USAGE
        lacking = table.lacks_postmaster()
        if lacking:
            log.warning("%s has no postmaster entry for %s; postmaster is accepted and "
                        "goes where its route takes it", options.recipients, ", ".join(lacking))
    if args.check_recipient is not None:
        return check_recipient(options, args.check_recipient)

    from .spool import Spool
    spool = Spool(options.spool, fsync_directory=options.spool_fsync_directory)
    try:
        spool.prepare()
    except OSError as exc:
        message = "cannot use spool %s: %s" % (options.spool, exc.strerror or exc)
        log.error(message)
        if options.stdin:
            from .replies import format_reply
            sys.stdout.buffer.write(format_reply("421 4.3.0", options.hostname))
            sys.stdout.buffer.flush()
        else:
            print("netsmtp: error: " + message, file=sys.stderr)
        return 1

    session_class = None
    if options.lmtp:
        from .lmtp_session import LMTPSession as session_class
    if options.stdin:
        from .inetd import serve_stdin
        serve_stdin(options, spool, *([session_class] if session_class else []))
        return 0

    return serve(options, spool, session_class)


def sink_main(options):
    """--sink: serve with a Sink for a spool; limits' state lives in a temporary directory."""
    import tempfile
    from .sink import Sink, SinkSession, is_loopback
    if isinstance(options.listen, tuple) and not is_loopback(options.listen[0]):
        log.warning("--sink listens on %s, not a loopback address: anyone who can reach it "
                    "can send it mail to print", options.listen[0] or "*")
    sink = Sink(options.sink_dir)
    try:
        sink.prepare()
    except OSError as exc:
        print("netsmtp: error: cannot use --sink-dir %s: %s" % (
            options.sink_dir, exc.strerror or exc), file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="netsmtp-sink-") as state:
        return serve(options.replace(spool=state), sink, SinkSession)


def serve(options, spool, session_class=None):
    """Listen on options.listen and serve until SIGTERM or SIGINT; the exit code."""
    if options.tls_cert:
        # Fail at start, not at the first STARTTLS; sessions reload it later.
        from .tls import TLSConfigError, server_context
        try:
            server_context(options.tls_cert, options.tls_key)
        except TLSConfigError as exc:
            print("netsmtp: error: %s" % exc, file=sys.stderr)
            return 1
    from .session import Session
    if options.workers:
        from .prefork import PreforkServer as Server
    else:
        from .server import ForkingServer as Server
    from .listener import describe
    try:
        server = Server(options, spool, session_class or Session)
    except OSError as exc:
        print("netsmtp: error: cannot listen on %s: %s" % (
            describe(options.listen), exc.strerror or exc), file=sys.stderr)
        return 1
    address = options.listen if isinstance(options.listen, str) else server.server_address
    log.info("listening on %s spool=%s hostname=%s workers=%s%s", describe(address),
             options.spool, options.hostname, options.workers or "fork",
             " protocol=LMTP" if options.lmtp else "")
    server.serve()
    return 0


def check_recipient(options, text):
    """--check-recipient: print what an address resolves to; 0 accepted, 1 refused.

    The same steps as a RCPT from a client that may not relay.
    """
    from .address import AddressError, domain_of, parse_path
    from .recipients import resolve
    from .replies import printable
    text = text.strip()
    try:
        address, params = parse_path(text if text.startswith("<") else "<%s>" % text)
    except AddressError:
        address, params = None, None
    if not address or params:
        print("%s: refused: 501 5.1.3 bad address syntax" % printable(text))
        return 1
    domain = domain_of(address)
    if domain and domain not in options.local_domains:
        print("%s: refused: 550 5.7.1 %s is not a local domain (relayed only for the "
              "relay networks and AUTH)" % (printable(address), printable(domain)))
        return 1
    from .policy import ROUTING
    if domain and ROUTING.intersection(address.rpartition("@")[0]):
        print("%s: refused: 550 5.7.1 a routing local part (%%, !, @) is a relay attempt" % (
            printable(address)))
        return 1
    from .recipients import current
    verify = None
    if options.verify_recipients:
        from .verify import verifier
        verify = verifier(options).verify
    resolution = resolve(options, address, current(options), verify)
    print(printable(str(resolution), 4096))
    return 0 if resolution.accepted else 1


def passwd(argv=None):
    """netsmtp-passwd USER: print a user:hash line for --auth-file.

    The password is read from stdin, or asked for twice on a terminal.
    """
    parser = make_parser("netsmtp-passwd",
                         "Print a user:hash line for netsmtp --auth-file.")
    parser.add_argument("user", help="the user name (no colon, no line break)")
    args = parser.parse_args(argv)
    if ":" in args.user or not args.user.isprintable():
        parser.error("the user name must be printable and hold no colon")
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("Password for %s: " % args.user)
        if getpass.getpass("Again: ") != password:
            print("netsmtp-passwd: error: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("netsmtp-passwd: error: empty password", file=sys.stderr)
        return 1
    from .auth import hash_password
    print("%s:%s" % (args.user, hash_password(password)))
    return 0
