"""The abuse benchmark's client side (see run.sh): silent connections, HTTP/2 rapid reset,
slowloris and a half-head flood against each proxy named on the command line after the
origin's log (`name port pid h2port` each), with the figures side by side."""
import socket
import sys
import time


def rss_kb(pid):
    """Resident memory of a process and its children (nginx: master and worker)."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def ok_request(port, timeout=2.0):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        data = s.recv(64)
        s.close()
        return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def slowloris(port, pid, n=500, window=70.0):
    before = rss_kb(pid)
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ")
            s.setblocking(False)
            socks.append(s)
        except OSError:
            pass
    time.sleep(2)
    per_conn = (rss_kb(pid) - before) * 1024 / max(len(socks), 1)
    start = time.time()
    open_socks = list(socks)
    closed_at = []
    next_byte = time.time() + 5
    while open_socks and time.time() - start < window:
        still = []
        for s in open_socks:
            try:
                if s.recv(4096) == b"":
                    closed_at.append(time.time() - start)
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed_at.append(time.time() - start)
                continue
            still.append(s)
        open_socks = still
        if time.time() >= next_byte:
            for s in open_socks:
                try:
                    s.send(b"a")
                except OSError:
                    pass
            next_byte += 5
        time.sleep(0.2)
    for s in open_socks:
        s.close()
    all_closed = (max(closed_at) if len(closed_at) == len(socks) else None)
    return len(socks), per_conn, all_closed, len(open_socks)


def half_heads(port, n):
    """`n` connections (those the proxy takes) each sending half a request head, so that
    every one costs the proxy a head buffer."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
            s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n")
            socks.append(s)
        except OSError:
            pass
    return socks


def idle_flood(port, pid, n=1500, legit=50):
    before = rss_kb(pid)
    socks = half_heads(port, n)
    time.sleep(3)
    ok = sum(ok_request(port) for _ in range(legit))
    peak = rss_kb(pid)
    for s in socks:
        s.close()
    # Memory given back once the flood is gone (an allocator that keeps freed pages shows
    # its peak here).
    time.sleep(15)
    after = rss_kb(pid)
    return len(socks), ok, legit, before, peak, after


def silent_flood(port, pid, n=800):
    """Connections that are opened and say nothing: what each costs the proxy."""
    before = rss_kb(pid)
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:
            pass
    time.sleep(2)
    per_conn = (rss_kb(pid) - before) * 1024 / max(len(socks), 1)
    for s in socks:
        s.close()
    return len(socks), per_conn


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


# GET / with :authority a (HPACK: three static-table entries and one literal).
H2_GET = bytes([0x82, 0x86, 0x84, 0x41, 0x01]) + b"a"


def origin_requests(log):
    with open(log, "rb") as f:
        return f.read().count(b'"GET /')


def rapid_reset(port, origin_log, window=10.0, batch=20):
    """HTTP/2 rapid reset slowed down past a codec's own guard: batches of streams opened
    (HEADERS) and, 5 ms later, cancelled (RST_STREAM), for `window` seconds; a cut
    connection is opened again. Returns streams sent, connections cut, and the requests
    the origin saw."""
    import threading

    origin_before = origin_requests(origin_log)
    sent = cuts = 0
    end = time.time() + window
    while time.time() < end:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            time.sleep(0.05)
            continue
        closed = threading.Event()

        def drain(sock=s, done=closed):
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        stream = 1
        try:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(0x4, 0, 0))
            while time.time() < end and not closed.is_set() and stream < 2**31 - 2 * batch:
                ids = list(range(stream, stream + 2 * batch, 2))
                s.sendall(b"".join(h2_frame(0x1, 0x5, i, H2_GET) for i in ids))
                time.sleep(0.005)
                s.sendall(b"".join(h2_frame(0x3, 0, i, (8).to_bytes(4, "big")) for i in ids))
                sent += len(ids)
                stream += 2 * batch
        except OSError:
            pass
        closed.wait(timeout=1)
        if closed.is_set():
            cuts += 1
        s.close()
    time.sleep(1)
    return sent, cuts, origin_requests(origin_log) - origin_before


def churn(port, pid, n=5000):
    """Many connections with half a head each, held, then gone: memory before, held, after."""
    before = rss_kb(pid)
    socks = half_heads(port, n)
    time.sleep(3)
    peak = rss_kb(pid)
    for s in socks:
        s.close()
    time.sleep(15)
    return len(socks), before, peak, rss_kb(pid)


def main_churn(args):
    targets = [(args[i], int(args[i + 1]), int(args[i + 2])) for i in range(0, len(args), 3)]
    results = {}
    for name, port, pid in targets:
        assert ok_request(port), f"{name} does not answer"
        results[name] = churn(port, pid)
    print("\nchurn: 5,000 connections with half a head each, held 3 s, closed; resident memory")
    print("before, while held, and 15 s after")
    print(f"{'proxy':8} {'connected':>10} {'before':>9} {'peak':>9} {'after':>9} {'kept':>6}")
    for name, (connected, before, peak, after) in results.items():
        kept = (after - before) / max(peak - before, 1) * 100
        print(
            f"{name:8} {connected:10d} {before / 1024:8.1f}M {peak / 1024:8.1f}M {after / 1024:8.1f}M"
            f" {kept:5.0f}%"
        )


def main(args):
    if args[0] == "churn":
        return main_churn(args[1:])
    origin_log = args[0]
    args = args[1:]
    targets = [
        (args[i], int(args[i + 1]), int(args[i + 2]), int(args[i + 3])) for i in range(0, len(args), 4)
    ]
    results = {}
    for name, port, pid, h2_port in targets:
        assert ok_request(port), f"{name} does not answer"
        results[name] = {"silent": silent_flood(port, pid)}
        time.sleep(2)
        results[name]["reset"] = rapid_reset(h2_port, origin_log)
        time.sleep(2)
        results[name]["slowloris"] = slowloris(port, pid)
        time.sleep(2)
        results[name]["flood"] = idle_flood(port, pid)
        time.sleep(2)
    print("\nsilent: 800 connections opened that send nothing")
    print(f"{'proxy':8} {'held':>5} {'bytes/conn':>11}")
    for name, r in results.items():
        held, per = r["silent"]
        print(f"{name:8} {held:5d} {per:11.0f}")
    print("\nrapid reset (HTTP/2, prior knowledge): for 10 s, 20 streams opened, cancelled 5 ms later,")
    print("again; a cut connection is reopened")
    print(f"{'proxy':8} {'streams sent':>13} {'connections cut':>16} {'origin requests':>16}")
    for name, r in results.items():
        sent, cuts, origin = r["reset"]
        print(f"{name:8} {sent:13d} {cuts:16d} {origin:16d}")
    print("\nslowloris: 500 connections, a head byte every 5 s")
    print(f"{'proxy':8} {'held':>5} {'bytes/conn':>11} {'all closed after':>17} {'open at 70 s':>13}")
    for name, r in results.items():
        held, per, closed, left = r["slowloris"]
        closed = f"{closed:.1f} s" if closed is not None else "-"
        print(f"{name:8} {held:5d} {per:11.0f} {closed:>17} {left:13d}")
    print("\nflood: 1,500 connections held, each with half a head; 50 ordinary requests meanwhile;")
    print("resident memory before, while held, and 15 s after they are gone")
    print(f"{'proxy':8} {'connected':>10} {'requests 200':>13} {'before':>9} {'peak':>9} {'after':>9}")
    for name, r in results.items():
        connected, ok, legit, before, peak, after = r["flood"]
        print(
            f"{name:8} {connected:10d} {ok:>9}/{legit} {before / 1024:8.1f}M {peak / 1024:8.1f}M"
            f" {after / 1024:8.1f}M"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
