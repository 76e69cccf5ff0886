"""netsmtp-queue --prometheus: the textfile-collector lines, read back by a real node_exporter."""

import re
import subprocess
import time
import urllib.request

from conftest import free_port, need_tool, wait_for
from smarthost import put, run_cli

from netsmtp.envelope import Envelope, Recipient, Result, Status
from netsmtp.queue_cli import queue_main

SAMPLE = re.compile(r'(netsmtp_[a-z_]+)(?:\{(\w+)="(\w+)"\})? (\S+)\Z')


def metrics_of(capsys, spool):
    assert run_cli(queue_main, ["--spool", spool.path, "--prometheus"]) == 0
    text = capsys.readouterr().out
    samples, declared = {}, []
    for line in text.splitlines():
        if line.startswith("# "):
            declared.append(line.split()[1:3])
            continue
        name, label, value, number = SAMPLE.match(line).groups()
        samples[(name, value)] = float(number)
    return text, samples, declared


def test_prometheus_counts_entries_recipients_and_age(spool, capsys):
    """Each metric has HELP and TYPE; entries by state, recipients by status, oldest age."""
    text, samples, declared = metrics_of(capsys, spool)
    assert samples[("netsmtp_queue_entries", "queued")] == 0
    assert samples[("netsmtp_queue_oldest_seconds", None)] == 0
    put(spool, recipients=["u@x.test", "v@x.test", "w@x.test"], arrival=time.time() - 600)
    queue_id = put(spool, recipients=["z@x.test"])
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    envelope.status["z@x.test"] = Recipient("z@x.test", Status.DEFERRED, Result(451, "4.7.1 later"))
    spool.write_state(queue_id, envelope.freeze_state())
    held = Envelope.thaw(spool.entry_path(put(spool, recipients=["h@x.test"])))
    held.held = True
    spool.write_state(held.id, held.freeze_state())
    broken = put(spool)
    spool.quarantine(broken, "test")
    text, samples, declared = metrics_of(capsys, spool)
    for name in ("netsmtp_queue_entries", "netsmtp_queue_recipients",
                 "netsmtp_queue_oldest_seconds"):
        assert ["HELP", name] in declared and ["TYPE", name] in declared
        assert "# TYPE %s gauge" % name in text
    assert samples[("netsmtp_queue_entries", "queued")] == 2
    assert samples[("netsmtp_queue_entries", "held")] == 1
    assert samples[("netsmtp_queue_entries", "quarantined")] == 1
    assert samples[("netsmtp_queue_recipients", "pending")] == 4
    assert samples[("netsmtp_queue_recipients", "deferred")] == 1
    assert samples[("netsmtp_queue_recipients", "failed")] == 0
    assert 600 <= samples[("netsmtp_queue_oldest_seconds", None)] < 3600


def test_node_exporter_reads_the_textfile(spool, capsys, tmp_path):
    """Debian's prometheus-node-exporter serves the file without a parse error."""
    exporter = need_tool("prometheus-node-exporter")
    put(spool, recipients=["u@x.test", "v@x.test"])
    text, _, _ = metrics_of(capsys, spool)
    collector = tmp_path / "textfile"
    collector.mkdir()
    (collector / "netsmtp.prom").write_text(text)
    port = free_port()
    proc = subprocess.Popen(
        [exporter, "--web.listen-address=127.0.0.1:%d" % port,
         "--collector.disable-defaults", "--collector.textfile",
         "--collector.textfile.directory=%s" % collector],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def scrape():
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return None
        served = wait_for(scrape, what="node_exporter")
    finally:
        proc.terminate()
        proc.wait(10)
    assert 'netsmtp_queue_entries{state="queued"} 1' in served
    assert 'netsmtp_queue_recipients{status="pending"} 2' in served
    assert "# TYPE netsmtp_queue_oldest_seconds gauge" in served
    assert "node_textfile_scrape_error 0" in served
