"""The benchmark harness still runs: its quickest mode against netsmtp only."""

import csv
import os
import subprocess
import sys

from conftest import ROOT, need_tool

RUN = os.path.join(ROOT, "bench", "run.py")


def test_quick_bench_against_the_prefork_server(tmp_path):
    """bench/run.py --quick measures netsmtp (msg/s, CPU per message), writes the table,
    the goals and the CSV."""
    need_tool("smtp-source")
    result = subprocess.run(
        [sys.executable, RUN, "--quick", "--no-install", "--peers", "netsmtp-prefork",
         "--loads", "reused-1,perconn-1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| reused-1 ")]
    assert rows and float(rows[0].split("|")[3]) > 0
    with open(tmp_path / "results.csv") as f:
        figures = list(csv.DictReader(f))
    assert {(row["load"], row["metric"]) for row in figures} == {
        ("reused-1", "msg/s"), ("reused-1", "cpu_us"), ("perconn-1", "msg/s"),
        ("perconn-1", "cpu_us")}
    cpu = [line for line in result.stdout.splitlines()
           if line.startswith("| reused-1 CPU per message ")]
    assert cpu and float(cpu[0].split("|")[3]) > 0
    # Without Postfix in the run, the goals that are ratios to it are not measured.
    assert "- reused-1 msg/s >= 1.0x Postfix: —: not measured" in result.stdout


def test_unknown_peer_is_a_usage_error(tmp_path):
    """A misspelt peer name is refused before anything starts."""
    result = subprocess.run([sys.executable, RUN, "--no-install", "--peers", "sendmail",
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown peer or load: sendmail" in result.stderr
