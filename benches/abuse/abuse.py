"""The abuse benchmark's client side (see run.sh): slowloris and an idle flood against each
proxy named on the command line, `name port pid` each, with the figures side by side."""
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


def idle_flood(port, pid, n=1500, legit=50):
    before = rss_kb(pid)
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
            # Each says something, so that every connection costs the proxy a head buffer.
            s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n")
            socks.append(s)
        except OSError:
            pass
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


def main(args):
    targets = [(args[i], int(args[i + 1]), int(args[i + 2])) for i in range(0, len(args), 3)]
    results = {}
    for name, port, pid in targets:
        assert ok_request(port), f"{name} does not answer"
        results[name] = {"slowloris": slowloris(port, pid)}
        time.sleep(2)
        results[name]["flood"] = idle_flood(port, pid)
        time.sleep(2)
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
