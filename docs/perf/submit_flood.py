#!/usr/bin/env python3
"""The coordinator's peak memory while N clients submit 16 MiB bodies at once.

    python3 docs/perf/submit_flood.py ./target/release/tether 32

Starts `tether coordinator` on a free loopback port with a fresh data directory, then N
clients each post a submission of 10,001 specs of about 1.5 KB (15.5 MB; refused at the
10,001st, so nothing is stored, but each body and its 10,000 parsed specs were held at the
peak). Each client holds back its body's last byte until all N have sent the rest (or 3 s
passed), so that the bodies are read together where nothing bounds them. Prints the answers'
statuses and the coordinator's peak RSS (VmHWM). Loopback only; bounded in count and time.
"""
import json, os, socket, subprocess, sys, tempfile, threading, time
from collections import Counter

binary, n = sys.argv[1], int(sys.argv[2])
assert 1 <= n <= 256, "1 to 256 clients"
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
data = tempfile.mkdtemp(prefix="submit-flood-")
coord = subprocess.Popen([binary, "--log", "warn", "coordinator", "--listen", f"127.0.0.1:{port}",
                          "--data-dir", os.path.join(data, "d")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    spec = json.dumps({"kind": "sleep", "config": {"ms": 1, "pad": "x" * 1500}})
    body = ('{"tasks": [' + ",".join([spec] * 10001) + "]}").encode()
    head = (f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    statuses, barrier = [], threading.Barrier(n, timeout=3)

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head + body[:-1])
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
            s.sendall(body[-1:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            statuses.append(answer[9:12].decode() or "closed")

    started = time.time()
    clients = [threading.Thread(target=client) for _ in range(n)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    with open(f"/proc/{coord.pid}/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    print(f"{n} clients, bodies of {len(body)} bytes, {time.time() - started:.1f} s; "
          f"statuses {dict(Counter(statuses))}; coordinator peak RSS {int(peak) / 1024:.0f} MB")
finally:
    coord.kill()
    coord.wait()
    subprocess.run(["rm", "-rf", data])
