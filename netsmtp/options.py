"""Every setting in one table: a constructor keyword, a flag and a TOML key.

SPEC lists each option once with its default, its parser, its help and the
programs that read it; the command line (--max-size), the config file
(max_size = ...) and Python (Options(max_size=...)) are all built from it, so
they cannot drift apart.  Each program offers the flags of its own options
only, but every program accepts every key of a shared TOML file.  Parsers take
the text of a flag or the native value of a TOML key or keyword.
"""


class OptionError(ValueError):
    """An option value that cannot be used; the message names the option."""


def parse_bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected yes or no, got %r" % value)


def parse_int(value):
    if isinstance(value, bool):
        raise ValueError("expected a whole number, got %r" % value)
    number = int(value)
    if number < 0:
        raise ValueError("expected a number >= 0, got %r" % value)
    return number


def parse_seconds(value):
    number = float(value)
    if not number > 0:
        raise ValueError("expected seconds > 0, got %r" % value)
    return number


def parse_delay(value):
    """Seconds >= 0; 0 turns the delay off."""
    number = float(value)
    if not number >= 0:
        raise ValueError("expected seconds >= 0, got %r" % value)
    return number


def parse_rate(value):
    """"N/SECONDS" -> (N, SECONDS): at most N events per SECONDS."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        count, seconds = value
    else:
        count, sep, seconds = str(value).partition("/")
        if not sep:
            raise ValueError("expected N/SECONDS, got %r" % value)
    count, seconds = int(count), float(seconds)
    if count < 1 or not seconds > 0:
        raise ValueError("expected N >= 1 and SECONDS > 0, got %r" % value)
    return count, seconds


def parse_list(value):
    """A comma-separated string or a list: ["a", "b"]; "none" is empty."""
    if isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        items = [] if str(value).strip().lower() == "none" else str(value).split(",")
    return tuple(item.strip() for item in items if item.strip())


def parse_domains(value):
    return tuple(d.lower().rstrip(".") for d in parse_list(value))


def parse_networks(value):
    """Networks, and the word "local" for sessions with no client address."""
    import ipaddress
    return tuple(item.lower() if item.lower() == "local" else ipaddress.ip_network(item, strict=False)
                 for item in parse_list(value))


def parse_hostport(value):
    """"HOST:PORT", "[v6]:PORT" or ":PORT" -> (host, port)."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT, got %r" % value)
    return host.strip("[]"), int(port)


class UnixPath(str):
    """The path of a Unix socket, given as "unix:PATH"."""

    def __repr__(self):
        return "unix:%s" % str.__str__(self)


def parse_endpoint(value):
    """"HOST:PORT" -> (host, port) as parse_hostport; "unix:PATH" -> UnixPath(PATH)."""
    if isinstance(value, UnixPath):
        return value
    text = str(value)
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path or "\0" in path:
            raise ValueError("expected unix:PATH, got %r" % value)
        return UnixPath(path)
    return parse_hostport(text)


def parse_filter_address(value):
    """A policy service or milter socket: HOST:PORT, inet:HOST:PORT, unix:PATH, or
    Postfix's inet:PORT@HOST; -> ("inet", (host, port)) or ("unix", path)."""
    text = str(value).strip()
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() == "unix":
        if not rest:
            raise ValueError("expected unix:PATH, got %r" % value)
        return "unix", rest
    if sep and kind.lower() in ("inet", "inet6"):
        text = rest
    if "@" in text:  # Sendmail's and opendkim's PORT@HOST
        port, _, host = text.partition("@")
        text = "%s:%s" % (host, port)
    host, port = parse_hostport(text)
    if not host:
        raise ValueError("expected HOST:PORT, got %r" % value)
    return "inet", (host, port)


def parse_filter_addresses(value):
    return tuple(parse_filter_address(item) for item in parse_list(value))


POLICY_DEFAULT_ACTION = "451 4.3.5 Server configuration problem"


def parse_policy_action(value):
    """The action taken when a policy service fails (a Postfix access(5) action).

    The table's default is known good (tests/test_cli.py checks it), so
    Options() checks it without importing netsmtp.policy_service, which a
    session without policy services never needs.
    """
    text = str(value).strip()
    if text != POLICY_DEFAULT_ACTION:
        from .policy_service import parse_action
        parse_action(text)  # ValueError when it is not one netsmtp takes
    return text


def parse_milter_action(value):
    action = str(value).strip().lower()
    if action not in ("tempfail", "accept", "reject"):
        raise ValueError("expected tempfail, accept or reject, got %r" % value)
    return action


def parse_mode(value):
    """File permissions in octal: "0660", "660" or a TOML number such as 0o660."""
    if isinstance(value, bool):
        raise ValueError("expected an octal mode, got %r" % value)
    mode = value if isinstance(value, int) else int(str(value), 8)
    if not 0 <= mode <= 0o777:
        raise ValueError("expected a mode from 0 to 0777, got %r" % value)
    return mode


def parse_str(value):
    return str(value)


def parse_delimiter(value):
    """Characters that may start a subaddress extension: "+" or "+-"."""
    text = str(value)
    if not text or any(c in text for c in '@."\\ \t') or not text.isprintable():
        raise ValueError("expected characters such as +, got %r" % value)
    return text


def parse_log_level(value):
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected debug, info, warning or error, got %r" % value)
    return level


def parse_duration(value):
    """Seconds, or a number with s, m, h or d: "300", "5m", "4h", "5d"."""
    text = str(value).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], None)
    number = float(text[:-1] if scale else text) * (scale or 1)
    if not number > 0:
        raise ValueError("expected a duration > 0, got %r" % value)
    return number


def parse_delay_warning(value):
    """A duration, or off (also 0): no delay reports."""
    if str(value).strip().lower() in ("off", "0", "none", "no"):
        return None
    return parse_duration(value)


def parse_tls_mode(value):
    mode = str(value).strip().lower()
    if mode not in ("off", "opportunistic", "required"):
        raise ValueError("expected off, opportunistic or required, got %r" % value)
    return mode


def parse_routes(value):
    """{"domain": "route"} (a TOML table) or "domain=route,*=route" -> dict."""
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = [item.partition("=")[::2] for item in parse_list(value)]
    routes = {}
    for domain, route in pairs:
        domain, route = str(domain).strip().lower().rstrip("."), str(route).strip()
        if not domain or not route.isidentifier():
            raise ValueError("expected DOMAIN=ROUTE, got %r" % ("%s=%s" % (domain, route)))
        routes[domain] = route
    return routes


# The programs that read options: the daemon, the queue runner and the queue lister.
DAEMON, SEND, QUEUE = "netsmtp", "netsmtp-send", "netsmtp-queue"


class Option:
    """One setting: its name, default, parser, one line of help and the programs reading it.

    A list whose flag names one item (--milter A --milter B, TOML milters =
    [A, B]) gives that flag as each.
    """

    __slots__ = ("name", "default", "parse", "help", "programs", "each")

    def __init__(self, name, default, parse, help, programs=(DAEMON,), each=None):
        self.name, self.default, self.parse, self.help = name, default, parse, help
        self.programs = frozenset(programs)
        self.each = each

    @property
    def flag(self):
        return self.each or "--" + self.name.replace("_", "-")


SPEC = {opt.name: opt for opt in (
    Option("listen", "127.0.0.1:2525", parse_endpoint,
           "address of the daemon, HOST:PORT or unix:PATH"),
    Option("listen_mode", "0660", parse_mode,
           "permissions of the socket file of --listen unix:PATH, in octal"),
    Option("lmtp", False, parse_bool,
           "speak LMTP (RFC 2033) instead of SMTP: LHLO, one reply per recipient"),
    Option("stdin", False, parse_bool,
           "serve one session on stdin/stdout (inetd, xinetd, systemd Accept=yes)"),
    Option("spool", "spool", parse_str, "spool directory", (DAEMON, QUEUE)),
    Option("spool_fsync_directory", False, parse_bool,
           "also fsync the spool directory before each 250, for filesystems where a "
           "file's fsync does not make its name durable (ext2, ext4 without a journal, "
           "some network filesystems)"),
    Option("hostname", None, parse_str,
           "name in the greeting and Received headers (default: the FQDN)", (DAEMON, SEND)),
    Option("local_domains", None, parse_domains,
           "comma-separated domains accepted from anyone (default: the hostname)",
           (DAEMON, SEND)),
    Option("relay_networks", "127.0.0.0/8,::1", parse_networks,
           "comma-separated networks that may relay to any domain, or none; "
           "the word local stands for sessions with no client address"),
    Option("dsn_networks", None, parse_networks,
           "comma-separated networks offered DSN (RFC 3461), or none; success reports "
           "reveal internal routing (default: everyone)"),
    # The PROXY protocol (netsmtp.proxy): the client behind a load balancer.
    Option("proxy_protocol", False, parse_bool,
           "every connection starts with a PROXY v1 or v2 header (HAProxy, AWS NLB)"),
    Option("proxy_networks", "127.0.0.0/8,::1", parse_networks,
           "comma-separated networks the PROXY headers may come from; others are closed"),
    Option("proxy_timeout", 5.0, parse_seconds, "seconds allowed for the PROXY header"),
    Option("max_size", 20_000_000, parse_int, "largest message accepted, in octets"),
    Option("spool_min_free", None, parse_int,
           "free octets the spool's filesystem keeps: below it MAIL gets 452 4.3.1 and "
           "netsmtp-send checks each state write before sending (default: 1.5 x max_size)",
           (DAEMON, SEND)),
    Option("max_recipients", 100, parse_int, "most recipients per message"),
    Option("timeout", 300.0, parse_seconds,
           "idle seconds before a session is closed (RFC 5321 section 4.5.3.2)"),
    Option("max_sessions", 100, parse_int, "most concurrent sessions of the server"),
    Option("backlog", 128, parse_int, "listen backlog of the server socket"),
    Option("workers", 4, parse_int,
           "warm prefork worker processes (0: fork one child per connection)"),
    Option("max_connections_per_worker", 1000, parse_int,
           "connections a prefork worker serves before it is replaced (0: no limit)"),
    # STARTTLS (RFC 3207), implicit TLS (RFC 8314) and AUTH (RFC 4954).
    Option("tls_cert", None, parse_str, "PEM certificate chain; enables STARTTLS"),
    Option("tls_key", None, parse_str, "PEM private key of --tls-cert"),
    Option("tls_on_connect", False, parse_bool,
           "TLS from the first byte (implicit TLS, port 465, RFC 8314)"),
    Option("tls_timeout", 30.0, parse_seconds, "seconds allowed for a TLS handshake"),
    Option("require_tls", False, parse_bool, "refuse MAIL before STARTTLS (530 5.7.0)"),
    Option("auth_file", None, parse_str,
           "file of user:hash lines (made by netsmtp-passwd); enables AUTH"),
    Option("auth_plaintext", False, parse_bool, "offer AUTH without TLS too"),
    Option("require_auth", False, parse_bool, "refuse MAIL before AUTH (530 5.7.0)"),
    Option("auth_fail_delay", 1.0, parse_delay,
           "seconds every AUTH answer waits per failure of the client or user in the "
           "last hour, at most 30 (0: off)"),
    # Defences: admission before the session, then limits within it.
    Option("conn_rate_limit", None, parse_rate,
           "most new sessions per client address, N/SECONDS (default: off)"),
    Option("conn_rate_total", None, parse_rate,
           "most new sessions in total, N/SECONDS (default: off)"),
    Option("max_sessions_per_client", None, parse_int,
           "most concurrent sessions per client address; relay networks are exempt "
           "(default: half of --max-sessions, at least 1; under --stdin off; 0: off)"),
    Option("max_bad_commands", 20, parse_int,
           "refused commands before 421 and close (0: no limit)"),
    Option("soft_error_limit", 10, parse_int,
           "refused commands answered at once before the tarpit's --error-delay starts"),
    Option("error_delay", 1.0, parse_delay,
           "tarpit: seconds each refused command past --soft-error-limit waits, flat (0: off)"),
    Option("max_messages", 1000, parse_int, "most messages per session (0: no limit)"),
    Option("max_session_recipients", 1000, parse_int,
           "most recipients per session (0: no limit)"),
    Option("session_timeout", 3600.0, parse_seconds,
           "longest a session may last, seconds; netsmtp-send removes an entry never "
           "committed once it is older", (DAEMON, SEND)),
    Option("greet_pause", 0.0, parse_delay,
           "seconds to wait before the greeting; earlier talkers get 554 (0: off)"),
    Option("helo_verify", False, parse_bool,
           "HELO must be allowed, the client's address literal, or resolve to it"),
    Option("helo_allowed", None, parse_domains,
           "comma-separated HELO names always accepted by --helo-verify"),
    # The queue runner, netsmtp-send (see netsmtp.runner).  The daemon reads the
    # smarthost's address, TLS and AUTH for --verify-recipients, and the route table
    # and maildir_root to refuse at RCPT a mailbox that does not exist.
    Option("smarthost", None, parse_hostport,
           "where netsmtp-send relays mail (and --verify-recipients asks), HOST:PORT",
           (DAEMON, SEND)),
    Option("smarthost_tls", "opportunistic", parse_tls_mode,
           "STARTTLS to the smarthost: off, opportunistic or required", (DAEMON, SEND)),
    Option("smarthost_ca", None, parse_str,
           "CA file verifying the smarthost's certificate (default: the system's)", (DAEMON, SEND)),
    Option("smarthost_user", None, parse_str, "user name for AUTH at the smarthost", (DAEMON, SEND)),
    Option("smarthost_password_file", None, parse_str,
           "file whose first line is the smarthost AUTH password", (DAEMON, SEND)),
    Option("smarthost_auth_plaintext", False, parse_bool,
           "allow AUTH to the smarthost without TLS", (DAEMON, SEND)),
    Option("smarthost_deadline", 600.0, parse_seconds,
           "longest one delivery attempt of one message to the smarthost may take, seconds",
           (SEND,)),
    Option("smarthost_timeout", 120.0, parse_seconds, "seconds to wait for the smarthost",
           (SEND,)),
    Option("maildir_root", None, parse_str,
           "deliver the local domains to MAILDIR_ROOT/<localpart>/ (the daemon checks at "
           "RCPT that the mailbox exists)", (DAEMON, SEND)),
    Option("lmtp_host", None, parse_endpoint,
           "where the lmtp route delivers (RFC 2033), HOST:PORT or unix:PATH", (SEND,)),
    Option("routes", None, parse_routes,
           "delivery per recipient domain, DOMAIN=ROUTE,... and *=ROUTE for the rest "
           "(default: local domains to maildir when --maildir-root is set, * to smarthost)",
           (DAEMON, SEND)),
    # Who exists at the local domains (netsmtp.recipients): the daemon refuses
    # unknown recipients at RCPT, netsmtp-send finds their Maildirs.
    Option("recipients", None, parse_str,
           "recipient table: mailboxes, aliases, @domain catch-alls; unknown local "
           "recipients get 550 5.1.1", (DAEMON, SEND)),
    Option("recipient_delimiter", None, parse_delimiter,
           "characters that start a subaddress extension, e.g. + (ann+lists@ falls "
           "back to ann@)", (DAEMON, SEND)),
    Option("verify_recipients", False, parse_bool,
           "ask the smarthost at RCPT whether a recipient of a local domain routed "
           "there exists (550 5.1.1 if not)"),
    Option("verify_timeout", 10.0, parse_seconds,
           "seconds a verification probe may take; then 450 4.1.1"),
    Option("verify_positive_ttl", "1d", parse_duration,
           "how long a verified recipient is remembered (s, m, h, d)"),
    Option("verify_negative_ttl", "1h", parse_duration,
           "how long a refused recipient is remembered (s, m, h, d)"),
    Option("retry_initial", "5m", parse_duration,
           "first retry delay after a deferral, doubling each attempt (s, m, h, d)", (SEND,)),
    Option("retry_max", "4h", parse_duration, "longest retry delay", (SEND,)),
    Option("max_queue_lifetime", "5d", parse_duration,
           "age after which recipients still deferred are bounced", (SEND,)),
    Option("delay_warning", None, parse_delay_warning,
           "age after which a still-deferred recipient gets one delay report (RFC 3464), "
           "or off", (SEND,)),
    Option("bounce_size_limit", 50_000, parse_int,
           "largest message a failure report with RET=FULL returns whole, in octets; "
           "past it, headers only", (SEND,)),
    # Development and filters (netsmtp.sink, netsmtp.policy_service, netsmtp.milter).
    Option("sink", False, parse_bool,
           "accept any message for anyone, print it to stdout, relay and keep nothing"),
    Option("sink_dir", None, parse_str,
           "with --sink: write each message to DIR/ID.eml instead (implies --sink)"),
    Option("policy_services", (), parse_filter_addresses,
           "a Postfix policy service asked at RCPT, HOST:PORT or unix:PATH (repeatable)",
           each="--policy-service"),
    Option("policy_end_of_message", False, parse_bool,
           "ask the policy services again at the end of each message"),
    Option("policy_timeout", 10.0, parse_seconds, "seconds to wait for a policy service"),
    Option("policy_default_action", POLICY_DEFAULT_ACTION, parse_policy_action,
           "action when a policy service is down, slow or answers garbage"),
    Option("milters", (), parse_filter_addresses,
           "a milter, HOST:PORT, inet:HOST:PORT or unix:PATH (repeatable; applied in order)",
           each="--milter"),
    Option("milter_timeout", 30.0, parse_seconds, "seconds to wait for each reply of a milter"),
    Option("milter_default_action", "tempfail", parse_milter_action,
           "tempfail, accept or reject, for a milter that is down, slow or broken"),
    Option("log_level", "info", parse_log_level, "debug, info, warning or error",
           (DAEMON, SEND, QUEUE)),
    Option("syslog", False, parse_bool, "log to syslog instead of stderr", (DAEMON, SEND, QUEUE)),
)}


def options_of(program):
    """The names of the options program reads, in table order."""
    return [name for name, opt in SPEC.items() if program in opt.programs]


class Options:
    """The settings of a server or session, validated once.

    Options(max_size=1000) takes any key of SPEC; a value may be text (as
    from the command line) or the native type.  Unknown keys and bad values
    raise OptionError naming the option.
    """

    def __init__(self, **values):
        unknown = sorted(set(values) - set(SPEC))
        if unknown:
            raise OptionError("unknown option %r" % unknown[0])
        for opt in SPEC.values():
            value = values.get(opt.name, opt.default)
            if value is not None:
                try:
                    value = opt.parse(value)
                except (TypeError, ValueError) as exc:
                    raise OptionError("%s: %s" % (opt.flag, exc)) from None
            setattr(self, opt.name, value)
        self._given = dict(values)
        if self.hostname is None:
            import socket  # here: a session over a pipe with --hostname needs none
            self.hostname = socket.getfqdn()
        if self.local_domains is None:
            self.local_domains = (self.hostname.lower(),)
        from .envelope import MAX_RECIPIENTS
        if self.max_recipients > MAX_RECIPIENTS:
            raise OptionError("--max-recipients: at most %d, got %d (the spool's envelope "
                              "bound)" % (MAX_RECIPIENTS, self.max_recipients))
        if self.spool_min_free is None:
            # Postfix's queue_minfree logic: room for one and a half messages.
            self.spool_min_free = self.max_size * 3 // 2
        if self.sink_dir:
            self.sink = True

    def given(self, name):
        """True when name was set (a flag, a TOML key or a keyword), not defaulted."""
        return name in self._given

    def replace(self, **changes):
        """A copy with some values changed."""
        return Options(**{**self._given, **changes})

    def __repr__(self):
        return "Options(%s)" % ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in SPEC)


def load_toml(path):
    """The options of a TOML file as a dict; dashes in keys become underscores."""
    import tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise OptionError("--config: cannot read %s: %s" % (path, exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError("--config: %s: %s" % (path, exc)) from None
    return {key.replace("-", "_"): value for key, value in data.items()}
