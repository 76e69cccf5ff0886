#!/usr/bin/env python3
"""Benchmark netsmtp against Postfix, aiosmtpd and smtp-sink on this machine.

    python3 bench/run.py            # everything, median of 3 runs (about 10 minutes)
    python3 bench/run.py --quick    # a smoke run: 1 run, small counts

Installs what is missing (Postfix, ucspi-tcp with apt-get; aiosmtpd with
pip), starts each peer on a free loopback port, runs every load against
every peer, runs each figure --runs times, and prints a Markdown table of
medians with each cell's ratio to Postfix measured in the same run.  The raw
figures go to --out/results.csv (and results.png when matplotlib imports).
See bench/README.md for what each figure means.
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loads import LoadFailed, StdinStartup, loads, python_pass_floor  # noqa: E402
from peers import PEERS, ROOT, tool  # noqa: E402

BASELINE = "postfix"
SEND_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "send_throughput.py")


def install_missing(peers):
    """apt-get/pip install the peers' programs that are not there yet."""
    debs = set()
    if not os.path.exists(tool("smtp-source")):  # drives every load; comes with postfix
        debs.add("postfix")
    if "netsmtp-stdin" in peers and not shutil.which("tcpserver"):
        debs.add("ucspi-tcp")
    if debs:
        sudo = [] if os.getuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(sudo + ["debconf-set-selections"], check=True, text=True, env=env,
                       input="postfix postfix/main_mailer_type select No configuration\n")
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                               *sorted(debs)], check=True, env=env)
    if "aiosmtpd" in peers:
        try:
            import aiosmtpd  # noqa: F401
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd"], check=True)


def measure(load, peer_names, runs, workdir, log):
    """{peer: [figures of each run]}; each peer is started fresh for the load."""
    results = {name: [] for name in peer_names}
    started = {}
    try:
        for name in peer_names:
            peer = PEERS[name]()
            peer.start(workdir)
            started[name] = peer
        for run in range(runs):
            for name, peer in started.items():   # interleaved, so drift hits all alike
                try:
                    figures = load.run(peer)
                except LoadFailed as exc:
                    log("  %s %s run %d FAILED: %s" % (load.name, name, run + 1, exc))
                    figures = None
                results[name].append(figures)
                if figures:
                    log("  %-10s %-16s run %d: %s" % (load.name, name, run + 1, ", ".join(
                        "%s=%.4g" % item for item in figures.items())))
    finally:
        for peer in started.values():
            peer.stop()
    return results


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratios(results, name, key="value", inverse=False):
    """The per-run ratio of name to Postfix; inverse for times (lower is better)."""
    out = []
    for mine, base in zip(results.get(name, []), results.get(BASELINE, []), strict=False):
        if mine and base and mine.get(key) and base.get(key):
            out.append(base[key] / mine[key] if inverse else mine[key] / base[key])
    return out


def send_throughput(quick, workdir, log):
    """netsmtp-send's msg/s to smtp-sink from bench/send_throughput.py, if present.

    It prints a row per way of removing (its columns end in msg/s and
    ms/msg); the figure is the row of netsmtp-send's default
    (QueueRunner.remove_batch: 1 is "fsync each", else a group commit).
    """
    if not os.path.exists(SEND_SCRIPT):
        return None
    args = [sys.executable, SEND_SCRIPT, "--dir", workdir] + (["--count", "300"] if quick else [])
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    rows = result.stdout.strip().splitlines()[1:]
    if result.returncode != 0 or not rows:
        log("  netsmtp-send FAILED: %s" % (result.stderr.strip()[-300:] or "no figures"))
        return None
    for row in rows:
        log("  netsmtp-send: %s" % row)
    sys.path.insert(0, ROOT)
    from netsmtp.runner import QueueRunner
    default = "fsync each" if QueueRunner.remove_batch == 1 else "group commit"
    for row in rows:
        if default in row:
            try:
                return float(row.split()[-2])
            except (IndexError, ValueError):
                return None
    return None


def table(all_results, peer_names, extra_rows):
    """The Markdown table: a row per load, a column per peer."""
    head = "| load | unit | " + " | ".join(peer_names) + " |"
    lines = [head, "|" + "---|" * (len(peer_names) + 2)]
    for load, results in all_results:
        inverse = load.unit == "s"
        cells = []
        for name in peer_names:
            value = median([f and f["value"] for f in results.get(name, [])])
            if value is None:
                cells.append("—" if name not in results else "failed")
                continue
            text = "%.3g" % value if value < 100 else "%.0f" % value
            ratio = median(ratios(results, name, inverse=inverse))
            if ratio is not None and name != BASELINE:
                text += " (%.2fx)" % ratio
            cells.append(text)
        lines.append("| %s | %s | %s |" % (load.name, load.unit, " | ".join(cells)))
        if any(f and "cpu_us" in f for fs in results.values() for f in fs):
            cells = []
            for name in peer_names:
                value = median([f and f.get("cpu_us") for f in results.get(name, [])])
                ratio = median(ratios(results, name, key="cpu_us"))
                cells.append("—" if value is None else "%.0f" % value + (
                    " (%.2fx)" % ratio if ratio is not None and name != BASELINE else ""))
            lines.append("| %s CPU per message | us | %s |" % (load.name, " | ".join(cells)))
        if any(f and "p50_ms" in f for fs in results.values() for f in fs):
            cells = []
            for name in peer_names:
                runs = [f for f in results.get(name, []) if f]
                cells.append("%.2f / %.2f" % (median([f["p50_ms"] for f in runs]),
                                              median([f["p99_ms"] for f in runs]))
                             if runs else "—")
            lines.append("| %s p50 / p99 latency | ms | %s |" % (load.name, " | ".join(cells)))
        if any(f and "rss_mb" in f for fs in results.values() for f in fs):
            rss = []
            for name in peer_names:
                values = [f["rss_mb"] for f in results.get(name, []) if f]
                rss.append("%.1f" % max(values) if values else "—")
            lines.append("| %s peak RSS | MB | %s |" % (load.name, " | ".join(rss)))
    lines.extend(extra_rows)
    return "\n".join(lines)


# The goals of issue 11, for netsmtp's default server against Postfix in the same run.
GOAL_PEER = "netsmtp-prefork"
RATE_GOALS = (("reused-1", 1.0), ("reused-10", 1.2), ("reused-50", 1.2), ("perconn-20", 1.0))
STDIN_GOAL = 2.0        # CPU per --stdin connection, times that of `python -c pass`
RSS_GOAL_MB = 16.0      # peak RSS while receiving the 100 MB message
SEND_GOAL = 1000.0      # netsmtp-send msg/s to smtp-sink


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return "median %.2fx, runs %s" % (statistics.median(values), " ".join(
        "%.2fx" % v for v in values))


def goals(all_results, stdin_ratios, send_rate):
    """A line per goal: the figure of this run and whether it met the goal."""
    by_load = {load.name: results for load, results in all_results}
    lines = ["", "Goals (%s against %s, ratios measured side by side in this run):"
             % (GOAL_PEER, BASELINE)]

    def verdict(ok):
        return "not measured" if ok is None else "met" if ok else "NOT met"

    for load, goal in RATE_GOALS:
        values = ratios(by_load.get(load, {}), GOAL_PEER)
        ratio = median(values)
        lines.append("- %s msg/s >= %.1fx Postfix: %s: %s" % (
            load, goal, spread(values) or "—", verdict(None if ratio is None else ratio >= goal)))
    cpu = [(load, ratios(by_load[load], GOAL_PEER, key="cpu_us")) for load in by_load
           if ratios(by_load[load], GOAL_PEER, key="cpu_us")]
    ok = None if not cpu else all(median(values) <= 1.0 for _, values in cpu)
    lines.append("- CPU per message <= Postfix's: %s: %s" % (
        "; ".join("%s %s" % (load, spread(values)) for load, values in cpu) or "—", verdict(ok)))
    ratio = median(stdin_ratios)
    lines.append("- --stdin CPU per connection <= %.0fx `python -c pass`: %s: %s" % (
        STDIN_GOAL, spread(stdin_ratios) or "—",
        verdict(None if ratio is None else ratio <= STDIN_GOAL)))
    rss = [f["rss_mb"] for f in by_load.get("big-100MB", {}).get(GOAL_PEER, []) if f]
    lines.append("- 100 MB message peak RSS < %.0f MB: %s: %s" % (
        RSS_GOAL_MB, "max %.1f MB" % max(rss) if rss else "—",
        verdict(max(rss) < RSS_GOAL_MB if rss else None)))
    lines.append("- netsmtp-send to smtp-sink >= %.0f msg/s: %s: %s" % (
        SEND_GOAL, "%.0f msg/s" % send_rate if send_rate else "—",
        verdict(None if send_rate is None else send_rate >= SEND_GOAL)))
    return lines


def write_csv(path, all_results, extra):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["load", "peer", "run", "metric", "value"])
        for load, results in all_results:
            for name, runs in results.items():
                for number, figures in enumerate(runs, 1):
                    for metric, value in (figures or {"failed": ""}).items():
                        metric = load.unit if metric == "value" else metric
                        out.writerow([load.name, name, number, metric, value])
        for row in extra:
            out.writerow(row)


def write_chart(path, all_results, peer_names):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rate_loads = [(load, res) for load, res in all_results if load.unit == "msg/s"]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(peer_names)
    for i, name in enumerate(peer_names):
        values = [median([f and f["value"] for f in res.get(name, [])]) or 0
                  for _, res in rate_loads]
        ax.bar([x + i * width for x in range(len(rate_loads))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rate_loads))])
    ax.set_xticklabels([load.name for load, _ in rate_loads])
    ax.set_ylabel("messages per second")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main(argv=None):
    all_loads = list(loads(False))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, small counts: a smoke test")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, --quick 1)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated, from: " + ", ".join(PEERS))
    extra_loads = ["stdin", "send"]
    parser.add_argument("--loads", default=",".join(all_loads + extra_loads),
                        help="comma-separated, from: " + ", ".join(all_loads + extra_loads))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                        help="directory for results.csv and results.png")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get/pip install")
    args = parser.parse_args(argv)
    peer_names = [p for p in args.peers.split(",") if p]
    load_names = [load for load in args.loads.split(",") if load]
    unknown = sorted(set(peer_names) - set(PEERS)) + sorted(
        set(load_names) - set(all_loads) - set(extra_loads))
    if unknown:
        parser.error("unknown peer or load: %s" % ", ".join(unknown))
    if "postfix" in peer_names and os.geteuid() != 0:
        parser.error("the postfix peer runs a private Postfix master, which needs root: "
                     "use sudo, or leave it out with --peers")
    runs = args.runs or (1 if args.quick else 3)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    if not args.no_install:
        install_missing(peer_names)
    os.makedirs(args.out, exist_ok=True)
    # An installed package has its bytecode compiled; a checkout run with
    # PYTHONDONTWRITEBYTECODE=1 would compile every module at every start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "netsmtp")],
                   check=True)
    chosen = loads(args.quick)
    all_results, extra_rows, extra_csv = [], [], []
    stdin_ratios, send_rate = [], None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="netsmtp-bench-") as workdir:
        os.chmod(workdir, 0o755)
        for name in load_names:
            if name in extra_loads:
                continue
            log("load %s" % name)
            all_results.append((chosen[name], measure(chosen[name], peer_names, runs,
                                                      workdir, log)))
        if "stdin" in load_names and "netsmtp-stdin" in peer_names:
            log("load stdin")
            count = 30 if args.quick else 200
            load = StdinStartup("stdin", count)
            stdin = measure(load, ["netsmtp-stdin"], runs, workdir, log)["netsmtp-stdin"]
            floor = [python_pass_floor(count) for _ in range(runs)]
            conn, cpu = median([f and f["value"] for f in stdin]), median(
                [f and f["cpu_ms"] for f in stdin])
            floor_rate, floor_cpu = median([f["value"] for f in floor]), median(
                [f["cpu_ms"] for f in floor])
            stdin_ratios = [mine["cpu_ms"] / base["cpu_ms"] for mine, base in
                            zip(stdin, floor, strict=False) if mine and base["cpu_ms"]]
            if conn and cpu:
                extra_rows.append(
                    "\nStdin mode under tcpserver, one message per connection: "
                    "%.0f conn/s, %.1f ms CPU per connection; `python3 -c pass`: %.0f runs/s, "
                    "%.1f ms CPU per run (CPU ratio %.2fx)." % (
                        conn, cpu, floor_rate, floor_cpu, cpu / floor_cpu))
            for number, (mine, base) in enumerate(zip(stdin, floor, strict=False), 1):
                for metric, value in (mine or {}).items():
                    extra_csv.append(["stdin", "netsmtp-stdin", number,
                                      "conn/s" if metric == "value" else metric, value])
                extra_csv.append(["stdin", "python3 -c pass", number, "runs/s", base["value"]])
                extra_csv.append(["stdin", "python3 -c pass", number, "cpu_ms", base["cpu_ms"]])
        if "send" in load_names:
            rate = send_rate = send_throughput(args.quick, workdir, log)
            if rate is not None:
                extra_rows.append("\nnetsmtp-send to smtp-sink over one reused connection: "
                                  "%.0f msg/s (bench/send_throughput.py)." % rate)
                extra_csv.append(["send", "netsmtp-send", 1, "msg/s", rate])
    print(table(all_results, peer_names, extra_rows))
    print("\n".join(goals(all_results, stdin_ratios, send_rate)))
    print("\n%d run(s) per figure, median shown; (Nx) = ratio to Postfix in the same run "
          "(for seconds, Postfix's time / this time); %.0f s in all." % (
              runs, time.monotonic() - started))
    csv_path = os.path.join(args.out, "results.csv")
    write_csv(csv_path, all_results, extra_csv)
    log("raw figures: %s" % csv_path)
    if write_chart(os.path.join(args.out, "results.png"), all_results, peer_names):
        log("chart: %s" % os.path.join(args.out, "results.png"))
    failed = any(f is None for _, res in all_results for fs in res.values() for f in fs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
