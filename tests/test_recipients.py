"""The recipient table: parsing, aliases, RCPT refusals, Maildir checks, reloads, the CLI."""

import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT, Conversation, make_options, spooled
from netsmtp import cli, recipients
from netsmtp.envelope import Envelope
from netsmtp.recipients import ALIAS, MAILBOX, REFUSED, RecipientTable, TableError
from netsmtp.spool import Spool

DOMAINS = ("example.com", "example.org", "example.net")

# The issue's example table, with comments where a line may have them.
TABLE = """\
# address                 [targets]
ann@example.com
Bob@Example.com           # a mailbox with a comment
sales@example.com         ann@example.com, bob@example.com
info@example.org          someone@elsewhere.example
@example.net              catchall@example.com
"""


def table_of(tmp_path, text, delimiter="", name="recipients"):
    path = tmp_path / name
    path.write_text(text)
    return RecipientTable.load(path, DOMAINS, delimiter, hostname="mx.example.com")


def load_error(tmp_path, text):
    with pytest.raises(TableError) as info:
        table_of(tmp_path, text)
    return str(info.value)


def test_the_issues_table_resolves_as_documented(tmp_path):
    """Mailboxes, an alias, a remote target and a catch-all, case ignored."""
    table = table_of(tmp_path, TABLE)
    ann = table.resolve("ANN@example.COM")
    assert (ann.kind, ann.targets) == (MAILBOX, ("ANN@example.COM",))
    assert table.resolve("bob@example.com").kind == MAILBOX
    sales = table.resolve("Sales@example.com")
    assert (sales.kind, sales.targets) == (ALIAS, ("ann@example.com", "bob@example.com"))
    assert table.resolve("info@example.org").targets == ("someone@elsewhere.example",)
    assert table.resolve("anyone@example.net").targets == ("catchall@example.com",)
    nobody = table.resolve("nobody@example.com")
    assert (nobody.kind, nobody.reply) == (REFUSED, "550 5.1.1")


def test_an_exact_entry_beats_the_catch_all(tmp_path):
    """@domain is used only when no exact entry matches."""
    table = table_of(tmp_path, "@example.net catchall@example.com\nzed@example.net\n")
    assert table.resolve("zed@example.net").kind == MAILBOX
    assert table.resolve("other@example.net").kind == ALIAS


def test_aliases_expand_recursively_without_duplicates(tmp_path):
    """Nested aliases flatten; an address reached twice is delivered once."""
    table = table_of(tmp_path, TABLE + "team@example.com sales@example.com, ANN@example.com,"
                     " info@example.org\nall@example.com team@example.com sales@example.com\n")
    assert table.resolve("all@example.com").targets == (
        "ann@example.com", "bob@example.com", "someone@elsewhere.example")


def test_eight_levels_of_aliases_load_and_nine_do_not(tmp_path):
    """Aliases may nest 8 deep; one more is an error naming the file and line."""
    chain = ["a%d@example.com a%d@example.com" % (i, i + 1) for i in range(8)]
    table = table_of(tmp_path, "\n".join(chain + ["a8@example.com"]) + "\n")
    assert table.resolve("a0@example.com").targets == ("a8@example.com",)
    chain = ["a%d@example.com a%d@example.com" % (i, i + 1) for i in range(9)]
    message = load_error(tmp_path, "\n".join(chain + ["a9@example.com"]) + "\n")
    assert "recipients:1:" in message and "deeper than 8" in message


@pytest.mark.parametrize("text, where, words", [
    ("a@example.com b@example.com\nb@example.com a@example.com\n", ":1:", "alias loop"),
    ("x@example.com\n@example.net y@example.net\n", ":2:", "alias loop"),
    ("ann@example.com\nbad address@example.com\n", ":2:", "bad address"),
    ("ann@example.com\nann@elsewhere.example\n", ":2:", "not a local domain"),
    ("ann@example.com\nsales@example.com ann@@x\n", ":2:", "bad target"),
    ("ann@example.com\nANN@example.com\n", ":2:", "listed twice"),
    ("ann@example.com \xff\n".encode("latin-1").decode("latin-1"), ":1:", "not UTF-8"),
])
def test_bad_tables_name_file_and_line(tmp_path, text, where, words):
    """A bad line, a loop or a foreign domain: file:line and a reason, nothing loaded."""
    path = tmp_path / "recipients"
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    with pytest.raises(TableError) as info:
        RecipientTable.load(path, DOMAINS)
    assert str(path) + where in str(info.value) and words in str(info.value)


def test_an_unreadable_table_is_an_error(tmp_path):
    """A missing file names itself."""
    with pytest.raises(TableError, match="cannot read"):
        RecipientTable.load(tmp_path / "missing", DOMAINS)


def test_subaddresses_fall_back_to_the_base_entry(tmp_path):
    """ann+lists@ matches ann+lists@ first, then ann@; the extension is kept."""
    table = table_of(tmp_path, TABLE + "ann+vip@example.com bob@example.com\n", delimiter="+-")
    plus = table.resolve("ann+lists@example.com")
    assert (plus.kind, plus.entry, plus.targets) == (
        MAILBOX, "ann@example.com", ("ann+lists@example.com",))
    assert table.resolve("ann-x@example.com").kind == MAILBOX
    assert table.resolve("ann+vip@example.com").targets == ("bob@example.com",)
    # An alias target gets no extension: sales+x@ goes to sales's targets as written.
    assert table.resolve("sales+x@example.com").targets == ("ann@example.com", "bob@example.com")
    assert table.resolve("nobody+ann@example.com").kind == REFUSED
    without = table_of(tmp_path, TABLE)
    assert without.resolve("ann+lists@example.com").kind == REFUSED


def test_postmaster_always_exists(tmp_path):
    """<postmaster> and postmaster@ each local domain, with or without an entry."""
    table = table_of(tmp_path, TABLE)
    assert table.lacks_postmaster() == sorted(DOMAINS)
    for address in ("postmaster", "PostMaster@example.com", "postmaster@example.net"):
        assert table.resolve(address).kind == MAILBOX, address
    table = table_of(tmp_path, TABLE + "postmaster@example.com ann@example.com\n")
    assert table.resolve("postmaster@example.com").targets == ("ann@example.com",)
    assert table.lacks_postmaster() == ["example.net", "example.org"]


# -- in a session -------------------------------------------------------------

@pytest.fixture
def with_table(tmp_path):
    path = tmp_path / "recipients"
    path.write_text(TABLE)
    options = make_options(tmp_path, local_domains=",".join(DOMAINS), recipients=str(path),
                           max_bad_commands=0)
    spool = Spool(options.spool)
    spool.prepare()
    return Conversation(options, spool), path


def rcpt(*addresses, data=False):
    lines = [b"EHLO c.test", b"MAIL FROM:<someone@far.example>"]
    lines += [b"RCPT TO:<%s>" % a.encode() for a in addresses]
    if data:
        lines += [b"DATA", b"Subject: t\r\n\r\nhi\r\n."]
    return lines + [b"QUIT"]


def test_unknown_local_recipients_get_550_511(with_table):
    """From any client (a relay client too): 550 5.1.1 Mailbox <address> unavailable."""
    converse, _ = with_table
    for peer in ("192.0.2.1", "127.0.0.1"):
        replies = converse(rcpt("nobody@example.com", "ann@example.com"), peer=peer)
        assert replies[3] == (550, ["550 5.1.1 Mailbox <nobody@example.com> unavailable"])
        assert replies[4][0] == 250
        assert converse.session.bad_commands == 1  # a refused command: tarpit, limit


def test_refusals_count_against_the_bad_command_limit(tmp_path, with_table):
    """A dictionary attack is cut off by --max-bad-commands like other errors."""
    converse, path = with_table
    converse.options = converse.options.replace(max_bad_commands=3)
    replies = converse(rcpt(*("guess%d@example.com" % i for i in range(10))))
    assert [code for code, _ in replies][-2:] == [550, 421]


def test_an_alias_puts_its_targets_in_the_envelope(with_table):
    """sales@ becomes ann@ and bob@ in the spooled envelope; the reply names sales@."""
    converse, _ = with_table
    replies = converse(rcpt("sales@example.com", "ann@example.com", "info@example.org",
                            data=True))
    assert replies[3] == (250, ["250 2.1.5 Recipient <sales@example.com> OK"])
    [entry] = spooled(converse.spool)
    envelope = Envelope.thaw(os.path.join(converse.spool.path, entry))
    assert envelope.recipients == ["ann@example.com", "bob@example.com",
                                   "someone@elsewhere.example"]


def test_the_table_is_reread_when_it_changes(with_table, caplog):
    """A new entry counts from the next session; a broken file keeps the old table."""
    converse, path = with_table
    assert converse.codes(rcpt("carol@example.com"))[3] == 550
    path.write_text(TABLE + "carol@example.com\n")
    assert converse.codes(rcpt("carol@example.com"))[3] == 250
    path.write_text(TABLE + "loop@example.com loop@example.com\n")
    with caplog.at_level(logging.ERROR, logger="netsmtp.recipients"):
        assert converse.codes(rcpt("carol@example.com"))[3] == 250
        assert converse.codes(rcpt("carol@example.com"))[3] == 250
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "recipients:7:" in errors[0] and "alias loop" in errors[0]
    path.unlink()
    assert converse.codes(rcpt("carol@example.com"))[3] == 250  # still the last good one


def test_maildir_without_a_table_accepts_only_existing_mailboxes(tmp_path):
    """No mailbox is invented: a local part without a directory gets 550 at RCPT."""
    root = tmp_path / "mail"
    (root / "alice").mkdir(parents=True)
    options = make_options(tmp_path, maildir_root=str(root), recipient_delimiter="+")
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool)
    replies = converse(rcpt("Alice@mx.test", "alice+news@mx.test", "bob@mx.test",
                            '"x"@mx.test', ".x@mx.test", "a/b@mx.test", "postmaster@mx.test"))
    assert [code for code, _ in replies[3:-1]] == [250, 250, 550, 550, 501, 550, 250]
    assert replies[5][1] == ["550 5.1.1 Mailbox <bob@mx.test> unavailable"]
    assert sorted(os.listdir(root)) == ["alice"]


def test_maildir_with_a_table_accepts_what_the_table_names(tmp_path):
    """With a table, its mailboxes exist (created on delivery); others are refused."""
    (tmp_path / "recipients").write_text(TABLE)
    options = make_options(tmp_path, local_domains=",".join(DOMAINS),
                           recipients=str(tmp_path / "recipients"),
                           maildir_root=str(tmp_path / "mail"))
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool)
    codes = converse.codes(rcpt("ann@example.com", "sales@example.com", "x@example.net",
                                "nobody@example.com"))
    assert codes[3:-1] == [250, 250, 250, 550]


# -- the command line -----------------------------------------------------------

def check(tmp_path, *args, table=TABLE):
    (tmp_path / "recipients").write_text(table)
    return subprocess.run(
        [sys.executable, "-m", "netsmtp", "--recipients", str(tmp_path / "recipients"),
         "--local-domains", ",".join(DOMAINS), "--hostname", "mx.example.com",
         "--spool", str(tmp_path / "spool"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("address, code, words", [
    ("sales@example.com", 0, "alias sales@example.com -> ann@example.com, bob@example.com"),
    ("ann@example.com", 0, "mailbox"),
    ("<postmaster>", 0, "postmaster always exists"),
    ("nobody@example.com", 1, "refused: 550 5.1.1"),
    ("someone@elsewhere.example", 1, "refused: 550 5.7.1"),
    # The %-hack is a relay attempt at RCPT, catch-all or not: so it is here.
    ("a%elsewhere.example@example.net", 1, "refused: 550 5.7.1"),
])
def test_check_recipient_prints_and_exits(tmp_path, address, code, words):
    """netsmtp --check-recipient: what it resolves to; 0 accepted, 1 refused."""
    result = check(tmp_path, "--check-recipient", address)
    assert result.returncode == code, result.stderr
    assert words in result.stdout


def test_a_bad_table_stops_the_daemon_with_exit_2(tmp_path):
    """At start a table error names file and line, and the exit code is 2."""
    result = check(tmp_path, table=TABLE + "loop@example.com loop@example.com\n")
    assert result.returncode == 2
    assert "recipients:7:" in result.stderr and "alias loop" in result.stderr


def test_a_table_without_postmaster_warns_at_start(tmp_path, capsys):
    """The warning names the domains; postmaster is accepted all the same."""
    (tmp_path / "recipients").write_text(TABLE)
    argv = ["--recipients", str(tmp_path / "recipients"), "--local-domains", "example.com",
            "--spool", str(tmp_path / "spool"), "--check-recipient", "postmaster@example.com"]
    table = TABLE.replace("info@example.org          someone@elsewhere.example\n", "")
    table = table.replace("@example.net              catchall@example.com\n", "")
    (tmp_path / "recipients").write_text(table)
    recipients._TABLES.clear()
    logger = logging.getLogger("netsmtp")
    saved = logger.handlers[:], logger.propagate, logger.level
    try:
        assert cli.main(argv) == 0
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved
    captured = capsys.readouterr()
    assert "no postmaster entry for example.com" in captured.err


def test_netsmtp_send_delivers_table_mailboxes_and_subaddresses(tmp_path):
    """A mailbox the table names is made on first delivery; ann+x@ lands in ann's."""
    from smarthost import put, run_cli

    from netsmtp.queue_cli import send_main
    (tmp_path / "recipients").write_text(TABLE)
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    put(spool, recipients=["ann+x@example.com", "Bob@example.com"])
    root = tmp_path / "mail"
    code = run_cli(send_main, [spool.path, "--recipients", tmp_path / "recipients",
                               "--recipient-delimiter", "+", "--maildir-root", root,
                               "--local-domains", ",".join(DOMAINS), "--hostname", "mx.test"])
    assert code == 0
    assert sorted(os.listdir(root)) == ["ann", "bob"]
    [name] = os.listdir(root / "ann" / "new")
    assert b"Delivered-To: ann+x@example.com" in (root / "ann" / "new" / name).read_bytes()


def test_an_alias_target_with_an_extension_lands_in_its_base_mailbox(tmp_path):
    """lists@ -> ann+lists@ delivers into ann's Maildir, as ann+lists@ itself does.

    A target with an entry of its own (here ann@ by its base) is that entry's
    mailbox; only a target no entry matches is a mailbox of its own name.
    """
    from smarthost import run_cli

    from netsmtp.queue_cli import send_main
    (tmp_path / "recipients").write_text("ann@example.com\nlists@example.com ann+lists@example.com\n")
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    converse = Conversation(make_options(tmp_path, local_domains=",".join(DOMAINS),
                                         recipients=str(tmp_path / "recipients"),
                                         recipient_delimiter="+",
                                         maildir_root=str(tmp_path / "mail")), spool)
    assert converse.codes(rcpt("lists@example.com", data=True))[3:-1] == [250, 354, 250]
    root = tmp_path / "mail"
    code = run_cli(send_main, [spool.path, "--recipients", tmp_path / "recipients",
                               "--recipient-delimiter", "+", "--maildir-root", root,
                               "--local-domains", ",".join(DOMAINS), "--hostname", "mx.test"])
    assert code == 0
    assert os.listdir(root) == ["ann"]
    [name] = os.listdir(root / "ann" / "new")
    assert b"Delivered-To: ann+lists@example.com" in (root / "ann" / "new" / name).read_bytes()


def test_netsmtp_send_refuses_a_bad_table_with_exit_2(tmp_path, capsys):
    """A table that does not load stops netsmtp-send before any delivery."""
    from smarthost import run_cli

    from netsmtp.queue_cli import send_main
    (tmp_path / "recipients").write_text("ann@nowhere.example\n")
    with pytest.raises(SystemExit) as info:
        run_cli(send_main, [tmp_path / "spool", "--recipients", tmp_path / "recipients",
                            "--local-domains", "example.com"])
    assert info.value.code == 2
    assert "recipients:1:" in capsys.readouterr().err


def rcpt_code(port, address):
    """The reply code to one RCPT over a fresh connection to the daemon."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("c.test")
        client.mail("someone@far.example")
        return client.rcpt(address)[0]


def test_every_worker_rereads_a_changed_table(tmp_path, server_factory):
    """The prefork daemon's workers each see a new entry from their next session on."""
    path = tmp_path / "recipients"
    path.write_text(TABLE)
    server = server_factory("--recipients", str(path), "--local-domains", ",".join(DOMAINS),
                            "--workers", "3")
    assert rcpt_code(server.port, "carol@example.com") == 550
    assert rcpt_code(server.port, "ann@example.com") == 250
    path.write_text(TABLE + "carol@example.com\n")
    assert [rcpt_code(server.port, "carol@example.com") for _ in range(6)] == [250] * 6
    assert "no postmaster entry" in server.output()


def test_a_bad_table_under_inetd_says_421_and_exits_2(tmp_path):
    """In --stdin mode the client hears 421 4.3.0, never a traceback; the exit code is 2."""
    (tmp_path / "recipients").write_text("ann@elsewhere.example\n")
    result = subprocess.run(
        [sys.executable, "-m", "netsmtp", "--stdin", "--recipients", str(tmp_path / "recipients"),
         "--local-domains", "example.com", "--hostname", "mx.test",
         "--spool", str(tmp_path / "spool")],
        cwd=ROOT, input=b"EHLO c.test\r\n", capture_output=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == b"421 4.3.0 mx.test service not available, try again later\r\n"


def test_the_toml_key_recipients_names_the_table(tmp_path):
    """recipients = "FILE" and recipient_delimiter in the config file work as the flags do."""
    (tmp_path / "recipients").write_text(TABLE)
    config = tmp_path / "netsmtp.toml"
    config.write_text('recipients = "%s"\nrecipient_delimiter = "+"\nlocal_domains = %s\n' % (
        tmp_path / "recipients", list(DOMAINS)))
    args = [sys.executable, "-m", "netsmtp", "--config", str(config), "--spool",
            str(tmp_path / "spool"), "--check-recipient"]
    ok = subprocess.run(args + ["bob+x@example.com"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "mailbox (entry bob@example.com)" in ok.stdout
    refused = subprocess.run(args + ["carol@example.com"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1


def test_a_process_whose_reload_fails_adopts_the_last_good_table_another_loaded(
        tmp_path, monkeypatch, caplog):
    """Two processes (two table caches): B, idle over a good change A loaded, then a broken file.

    B's own table is the one from before the good change; the broken file must
    leave B with the last good table (A's, shared in SPOOL/locks), not its own.
    """
    path = tmp_path / "recipients"
    path.write_text("ann@example.com\n")
    options = make_options(tmp_path, recipients=str(path), local_domains=",".join(DOMAINS))
    process_a, process_b = {}, {}

    def in_process(cache):
        monkeypatch.setattr(recipients, "_TABLES", cache)
        return recipients.current(options)

    for cache in (process_a, process_b):
        assert in_process(cache).resolve("ann@example.com").accepted
    locks = tmp_path / "spool" / "locks"
    assert stamps(locks) == {}  # no change yet: nothing written
    path.write_text("carol@example.com\n")
    table = in_process(process_a)
    assert [table.resolve(a).accepted for a in ("carol@example.com", "ann@example.com")] == [
        True, False]
    written = stamps(locks)
    path.write_text("carol@example.com\nnot an address\n")
    with caplog.at_level(logging.ERROR, logger="netsmtp.recipients"):
        for _ in range(2):
            for cache in (process_b, process_a):
                table = in_process(cache)
                assert [table.resolve(a).accepted
                        for a in ("carol@example.com", "ann@example.com")] == [True, False]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("recipients:2: bad address" in e for e in errors)
    assert stamps(locks) == written  # a failed reload writes nothing
    assert [name for name in written if name.endswith(".json")]  # what A shared


def stamps(directory):
    """{file name: modification time} of the files in directory (none when it is missing)."""
    if not directory.exists():
        return {}
    return {name: os.stat(directory / name).st_mtime_ns for name in os.listdir(directory)}


@pytest.mark.parametrize("server_args", [
    ("--workers", "0"),  # the forking server: a child per session
    ("--workers", "2", "--max-connections-per-worker", "1"),  # a fresh worker per session
], ids=["forking", "prefork-respawned"])
def test_a_broken_reload_keeps_the_last_good_table_in_new_processes(
        tmp_path, server_factory, server_args):
    """A process forked after a good reload and a bad one serves the good reload, not the start's.

    Without the parent rereading the table, each child starts from the table the
    daemon began with: a recipient removed since would come back once the file broke.
    """
    path = tmp_path / "recipients"
    path.write_text("ann@example.com\n")
    server = server_factory("--recipients", str(path), "--local-domains", ",".join(DOMAINS),
                            *server_args)
    assert rcpt_code(server.port, "ann@example.com") == 250
    path.write_text("carol@example.com\n")
    assert [rcpt_code(server.port, a) for a in ("carol@example.com", "ann@example.com")] == [
        250, 550]
    path.write_text("carol@example.com\nnot an address\n")
    assert [rcpt_code(server.port, a) for _ in range(2)
            for a in ("carol@example.com", "ann@example.com")] == [250, 550] * 2
    assert "recipients:2: bad address" in server.output()
