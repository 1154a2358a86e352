#!/usr/bin/env python3
"""Command tasks end to end: one coordinator, one worker, N `true` command tasks.

Usage: python3 docs/perf/command_tasks.py <tether binary> [tasks] [slots]

Starts a coordinator on a free loopback port with a temporary data directory and one worker
with `slots` slots, submits `tasks` command tasks that run `true` in one request, and waits
until every one has ended. Prints the seconds from the submission to the last task's end, the
tasks a second, and the worker's CPU seconds (user + system, its children's included, and
those of the children still running: its warden) per task: what running a `command` attempt costs the worker (the process, its warden, the
supervision), beside what the task itself does (here nothing).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU of the process and its waited-for children, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def live_children_cpu(pid):
    """User + system CPU of the live children of `pid` (its warden), from /proc."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def main():
    binary = sys.argv[1]
    tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    slots = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TETHER_LOG="warn")
        coord = subprocess.Popen(
            [binary, "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", f"{tmp}/data"],
            env=env,
        )
        worker = None
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    get(f"{base}/api/v1/workers")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the coordinator did not start")
                    time.sleep(0.05)
            worker = subprocess.Popen(
                [binary, "worker", "--coordinator", base, "--id", "bench", "--slots", str(slots),
                 "--state-dir", f"{tmp}/worker"],
                env=env,
            )
            while not get(f"{base}/api/v1/workers"):
                if time.monotonic() > deadline:
                    raise SystemExit("the worker did not register")
                time.sleep(0.05)
            spec = {"kind": "command", "config": {"program": "true"}}
            with open(f"{tmp}/specs.json", "w") as f:
                json.dump({"tasks": [spec] * tasks}, f)
            warden0 = live_children_cpu(worker.pid)
            cpu0 = cpu_seconds(worker.pid) + warden0
            t0 = time.monotonic()
            subprocess.run(
                [binary, "submit", "--coordinator", base, "--file", f"{tmp}/specs.json",
                 "--json", "--watch"],
                env=env, check=True, stdout=subprocess.DEVNULL, timeout=600,
            )
            took = time.monotonic() - t0
            warden = live_children_cpu(worker.pid) - warden0
            cpu = cpu_seconds(worker.pid) + warden + warden0 - cpu0
            print(f"{tasks} command tasks (`true`), 1 worker, {slots} slots: {took:.2f} s, "
                  f"{tasks / took:.0f} tasks/s, worker CPU {cpu * 1e3 / tasks:.2f} ms a task "
                  f"(its children's included; of it the warden's {warden * 1e3 / tasks:.3f} ms)")
        finally:
            for p in (worker, coord):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()


if __name__ == "__main__":
    main()
