"""The command line and the options table: flags, TOML keys, keywords, exit codes."""

import ipaddress
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from netsmtp.cli import main
from netsmtp.options import DAEMON, QUEUE, SEND, SPEC, OptionError, Options, options_of
from netsmtp.queue_cli import queue_main, send_main
from netsmtp.spool import Spool
from smarthost import run_cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "netsmtp", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)


@pytest.mark.parametrize("args,fragment", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--max-size", "lots"], "--max-size"),
    (["--listen", "nowhere"], "--listen"),
    (["--relay-networks", "10.0.0.0/33"], "--relay-networks"),
    (["--timeout", "0"], "--timeout"),
    (["--log-level", "chatty"], "--log-level"),
], ids=["unknown-flag", "size", "listen", "network", "timeout", "log-level"])
def test_bad_flag_is_one_line_and_exit_2(args, fragment, tmp_path):
    """A bad flag or value: one clear line on stderr, exit code 2, nothing started."""
    result = run(*args, "--spool", str(tmp_path / "s"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr
    assert result.stderr.startswith("netsmtp: error: ")


def test_bad_config_value_is_exit_2(tmp_path):
    """A bad value in the TOML file is reported like a bad flag."""
    config = tmp_path / "netsmtp.toml"
    config.write_text('max_recipients = "many"\n')
    result = run("--config", str(config))
    assert result.returncode == 2 and "--max-recipients" in result.stderr


@pytest.mark.parametrize("text", ['nonsense = 1\n', 'max_size = [\n'], ids=["unknown", "syntax"])
def test_unknown_or_broken_config_is_exit_2(tmp_path, text):
    """An unknown key or a TOML syntax error names the file and exits 2."""
    config = tmp_path / "netsmtp.toml"
    config.write_text(text)
    result = run("--config", str(config))
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_missing_config_file_is_exit_2(tmp_path):
    """A config file that cannot be read is a usage error."""
    result = run("--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2 and "absent.toml" in result.stderr


def test_unwritable_spool_is_reported_at_start(tmp_path):
    """The daemon refuses to start on a spool it cannot write: exit 1, a clear line."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("--spool", str(blocker / "spool"), "--listen", "127.0.0.1:0")
    assert result.returncode == 1 and "cannot use spool" in result.stderr


def test_port_in_use_is_reported(tmp_path):
    """A listen address that cannot be bound: exit 1 and the reason."""
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run("--spool", str(tmp_path / "s"), "--listen", "127.0.0.1:%d" % port)
    assert result.returncode == 1 and "cannot listen" in result.stderr


def flags_in(text):
    """The long flags a --help text shows (--no-X forms counted as --X)."""
    return {flag.replace("--no-", "--") for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", text)}


def test_help_lists_every_option():
    """Every option of the table is a command-line flag of a program that reads it."""
    result = run("--help")
    assert result.returncode == 0
    for opt in SPEC.values():
        assert DAEMON in opt.programs or SEND in opt.programs or QUEUE in opt.programs, opt.name
        if DAEMON in opt.programs:
            assert opt.flag in flags_in(result.stdout), opt.flag


@pytest.mark.parametrize("program,main_function", [
    (DAEMON, main), (SEND, send_main), (QUEUE, queue_main)])
def test_help_shows_only_the_programs_own_flags(program, main_function, capsys):
    """Each --help lists exactly the options its program reads; shared ones appear in each."""
    with pytest.raises(SystemExit) as exited:
        main_function(["--help"])
    assert exited.value.code == 0
    own = {SPEC[name].flag for name in options_of(program)}
    shown = flags_in(capsys.readouterr().out) & {opt.flag for opt in SPEC.values()}
    assert shown == own
    assert "--log-level" in shown if program != QUEUE else "--spool" in shown


def test_daemon_help_leaves_out_the_queue():
    """netsmtp --help leaves out the retry flags it ignores, and shows the routes it checks."""
    shown = flags_in(run("--help").stdout)
    assert "--listen" in shown and "--max-size" in shown
    assert not shown & {"--smarthost-timeout", "--retry-max", "--max-queue-lifetime"}
    assert {"--routes", "--maildir-root", "--recipients"} <= shown


def test_one_config_file_serves_both_programs(tmp_path, capsys):
    """Each program accepts the other's keys in a shared TOML file; unknown keys still fail."""
    from netsmtp import cli
    config = tmp_path / "netsmtp.toml"
    config.write_text('listen = "127.0.0.1:0"\nworkers = 2\nmax_size = 1000\n'
                      'smarthost = "127.0.0.1:1"\nretry_max = "1h"\nhostname = "mx.test"\n')
    parser = cli.make_parser(DAEMON)
    cli.add_options(parser, options_of(DAEMON))
    options = cli.options_from(parser, parser.parse_args(["--config", str(config)]))
    assert options.max_size == 1000 and options.smarthost == ("127.0.0.1", 1)
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    assert run_cli(send_main, ["--config", config, "--dry-run", spool.path]) == 0
    assert run_cli(queue_main, ["--config", config, "--spool", spool.path]) == 0
    capsys.readouterr()
    config.write_text('no_such_key = 1\n')
    with pytest.raises(SystemExit) as exited:
        run_cli(send_main, ["--config", config, spool.path])
    assert exited.value.code == 2 and "no_such_key" in capsys.readouterr().err


def test_main_returns_exit_codes(capsys):
    """main(argv) is a function returning an int; --version exits 0."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and "netsmtp" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["--max-size", "x"])
    assert exited.value.code == 2


def test_console_script_and_module_share_main():
    """setup.py's netsmtp script and `python -m netsmtp` both call netsmtp.cli:main."""
    setup = open(ROOT + "/setup.py").read()
    assert '"netsmtp = netsmtp.cli:main"' in setup
    assert "main()" in open(ROOT + "/netsmtp/__main__.py").read()


# -- the options table ---------------------------------------------------------------

def test_defaults(tmp_path):
    """The documented defaults."""
    options = Options(hostname="mx.test")
    assert options.listen == ("127.0.0.1", 2525)
    assert options.spool == "spool" and options.stdin is False
    assert options.local_domains == ("mx.test",)
    assert options.relay_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                      ipaddress.ip_network("::1/128"))
    assert options.max_size == 20_000_000 and options.max_recipients == 100
    assert options.timeout == 300.0


def test_hostname_defaults_to_the_fqdn():
    """Without --hostname, the machine's FQDN names the server."""
    import socket
    assert Options().hostname == socket.getfqdn()


@pytest.mark.parametrize("name,text,value", [
    ("listen", "[::1]:25", ("::1", 25)), ("listen", ":2525", ("", 2525)),
    ("local_domains", "A.test, b.test.", ("a.test", "b.test")),
    ("relay_networks", "none", ()), ("relay_networks", ["10.0.0.0/8"], (ipaddress.ip_network("10.0.0.0/8"),)),
    ("syslog", "yes", True), ("syslog", False, False), ("max_size", "100", 100), ("max_size", 7, 7),
])
def test_option_parsing(name, text, value):
    """Text from a flag and native values from TOML or Python parse alike."""
    assert getattr(Options(hostname="h", **{name: text}), name) == value


def test_unknown_keyword_is_refused():
    """Options(**kw) rejects a misspelt option instead of ignoring it."""
    with pytest.raises(OptionError, match="max_sizes"):
        Options(max_sizes=1)


def test_config_file_and_flags_combine(tmp_path, monkeypatch):
    """TOML keys (with dashes or underscores) set options; flags override them."""
    from netsmtp import cli
    config = tmp_path / "c.toml"
    config.write_text('max-size = 1234\nmax_recipients = 5\nlocal_domains = ["a.test", "b.test"]\n')
    parser = cli.make_parser("netsmtp")
    cli.add_options(parser, SPEC)
    args = parser.parse_args(["--config", str(config), "--max-recipients", "9", "--hostname", "h"])
    options = cli.options_from(parser, args)
    assert options.max_size == 1234 and options.max_recipients == 9
    assert options.local_domains == ("a.test", "b.test")


def sample_argv():
    """Every daemon flag once, in the forms argparse takes: --flag V, --flag=V, --bool, --no-bool."""
    argv = ["--stdin"]
    for number, name in enumerate(options_of(DAEMON)):
        opt = SPEC[name]
        if name == "stdin":
            continue
        if opt.parse.__name__ == "parse_bool":
            argv.append(opt.flag if number % 2 else "--no-" + opt.flag[2:])
        elif opt.each:
            argv += [opt.flag, "a%d" % number, "%s=b%d" % (opt.flag, number)]
        elif number % 2:
            argv += [opt.flag, "v%d" % number]
        else:
            argv.append("%s=v%d" % (opt.flag, number))
    return argv + ["--config", "c.toml"]


def test_quick_flags_read_what_argparse_reads():
    """The --stdin parser, built from the same table, gives argparse's values for every flag."""
    from netsmtp import cli
    argv = sample_argv()
    parser = cli.daemon_parser()
    expected = parser.parse_args(argv)
    quick = cli.quick_flags(argv, options_of(DAEMON))
    for name in [*options_of(DAEMON), "config"]:
        assert getattr(quick, name, None) == getattr(expected, name), name


@pytest.mark.parametrize("argv", [
    ["--stdin", "--spo", "s"],               # an abbreviation argparse would take
    ["--stdin", "--help"],
    ["--stdin", "--version"],
    ["--stdin", "--spool"],                  # a missing value: argparse says so
    ["--stdin", "--max-size", "-5"],         # a value that looks like a flag
    ["--stdin=yes"],
    ["--stdin", "stray"],
    ["--stdin", "--check-recipient", "a@b.test"],
])
def test_quick_flags_leave_the_unusual_to_argparse(argv):
    """Anything but the plain forms goes to argparse, so its messages and behaviour stay."""
    from netsmtp import cli
    assert cli.quick_flags(argv, options_of(DAEMON)) is None


def test_bad_value_under_stdin_is_still_one_line_and_exit_2(tmp_path):
    """A bad value read by the quick parser is refused exactly as argparse's path refuses it."""
    result = run("--stdin", "--spool", str(tmp_path / "s"), "--max-size", "lots")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("netsmtp: error: --max-size")


LEAN_START = """
import sys
sys.argv = ["netsmtp", "--stdin", "--spool", sys.argv[1], "--hostname", "mx.test"]
from netsmtp.cli import main
main()
sys.stderr.write("MODULES " + " ".join(sorted(sys.modules)) + "\\n")
"""


def test_stdin_session_imports_only_what_it_uses(tmp_path):
    """A plain --stdin session loads no argparse, dataclasses (inspect) or filter modules."""
    result = subprocess.run(
        [sys.executable, "-c", LEAN_START, str(tmp_path / "spool")], cwd=ROOT, timeout=30,
        input=b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
              b"Subject: x\r\n\r\nx\r\n.\r\nQUIT\r\n", capture_output=True)
    assert b"250 2.6.0" in result.stdout
    modules = result.stderr.decode().split("MODULES ")[1].split()
    assert "netsmtp.session" in modules
    assert {"argparse", "dataclasses", "inspect", "netsmtp.policy_service",
            "netsmtp.filters", "logging.handlers"}.isdisjoint(modules)


def test_policy_default_action_is_one_netsmtp_takes():
    """Options() trusts the table's default without importing the policy client: it must parse."""
    from netsmtp.options import POLICY_DEFAULT_ACTION
    from netsmtp.policy_service import parse_action
    assert SPEC["policy_default_action"].default == POLICY_DEFAULT_ACTION
    parse_action(POLICY_DEFAULT_ACTION)


def test_syslog_lines_are_what_syslog_expects(tmp_path):
    """--syslog: one datagram per record, <priority> of facility mail, then netsmtp[pid]:."""
    import logging
    import os
    import socket

    from netsmtp import cli
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(address)
        handler = cli.syslog_handler(address)
        record = logging.LogRecord("netsmtp.session", logging.WARNING, __file__, 1,
                                   "%s: refused", ("c.test",), None)
        handler.handle(record)
        handler.handle(logging.LogRecord("netsmtp", logging.INFO, __file__, 1, "queued", (), None))
        handler.close()
        first, second = syslog.recv(4096), syslog.recv(4096)
    assert first == b"<20>netsmtp[%d]: c.test: refused\0" % os.getpid()
    assert second == b"<22>netsmtp[%d]: queued\0" % os.getpid()
    assert cli.syslog_handler(str(tmp_path / "none")) is None
