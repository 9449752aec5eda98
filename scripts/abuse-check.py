#!/usr/bin/env python3
"""Runs the hardening issue's abuse cases against one build of Switchboard and
prints what happened, so that two builds can be compared (before and after a
change). Starts its own redis-server, one node and one balancer on free
loopback ports, with the programs' default limits; every wait is bounded.

    scripts/abuse-check.py [BIN_DIR]      # default: target/debug

Cases: a kept-alive connection's second request head trickled a byte a
second; a connection that never sends; a 40 KB request head; /metrics and
/nodes on the public port; the admin port's default address; the balancer
under `prlimit --nofile=600` with 350 clients opening WebSockets while the
admin port is asked for /health; a Redis URL with a wrong password (what the
logs say). Standard library only.
"""

import concurrent.futures as futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug")
WAIT = 45.0  # longest any single case waits
TMP = tempfile.mkdtemp(prefix="sb-abuse-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, limit=20.0):
    end = time.time() + limit
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return True
        except Exception:
            time.sleep(0.1)
    return False


def spawn(name, args, log, prefix=()):
    out = open(os.path.join(TMP, log), "wb")
    return subprocess.Popen([*prefix, os.path.join(BIN, name), *args], stdout=out, stderr=out)


def balancer_args(redis, port, admin, admin_listen=True):
    a = ["--listen", f"127.0.0.1:{port}", "--redis", redis,
         "--pid-file", f"{TMP}/b{port}.pid", "--upgrade-sock", f"{TMP}/b{port}.sock",
         "--health-interval-ms", "200", "--grace-period-secs", "0", "--shutdown-timeout-secs", "1"]
    if admin_listen:
        a += ["--admin-listen", f"127.0.0.1:{admin}"]
    return a


def response(sock, limit=5.0):
    """Reads until the peer closes or a whole head arrives; returns the status line."""
    sock.settimeout(limit)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.split(b"\r\n", 1)[0].decode(errors="replace") or "(no answer)"


def trickled_second_head(host, port):
    s = socket.create_connection((host, port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    first = response(s)
    began = time.time()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
    s.settimeout(1.0)
    answer = b""
    while time.time() - began < WAIT:
        try:
            s.sendall(b"X")
            chunk = s.recv(4096)
            if not chunk:
                return f"first {first!r}; closed after {time.time() - began:.1f} s, answer {answer[:30]!r}"
            answer += chunk
        except socket.timeout:
            continue
        except OSError:
            return f"first {first!r}; closed after {time.time() - began:.1f} s, answer {answer[:30]!r}"
    return f"first {first!r}; still open after {WAIT:.0f} s"


def silent(host, port):
    s = socket.create_connection((host, port))
    s.settimeout(WAIT)
    began = time.time()
    try:
        s.recv(1)
        return f"closed after {time.time() - began:.1f} s"
    except socket.timeout:
        return f"still open after {WAIT:.0f} s"
    except OSError as e:
        return f"reset after {time.time() - began:.1f} s ({e})"


def big_head(host, port):
    s = socket.create_connection((host, port))
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    except OSError as e:
        return f"send failed: {e}"
    return response(s)


def get(url, headers=None):
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5)
        return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception as e:
        return None, str(e)


UPGRADE = (b"GET /chathub HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def descriptor_limit(redis):
    port, admin = free_port(), free_port()
    b = spawn("switchboard-balancer", balancer_args(redis, port, admin), "limited.log",
              prefix=("prlimit", "--nofile=600:600", "--"))
    try:
        if not wait_http(f"http://127.0.0.1:{admin}/health"):
            return "balancer did not start"
        time.sleep(1.0)
        held, outcomes = [], {}
        began = time.time()
        for _ in range(350):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
                s.sendall(UPGRADE)
                status = response(s, 1.0)
            except OSError as e:
                status, s = f"connect failed ({e.__class__.__name__})", None
            key = status.split(" ")[1] if status.startswith("HTTP/") else status
            outcomes[key] = outcomes.get(key, 0) + 1
            if s is not None:
                held.append(s)
        took = time.time() - began
        t0 = time.time()
        admin_status, _ = get(f"http://127.0.0.1:{admin}/health")
        admin_took = time.time() - t0
        for s in held:
            s.close()
        time.sleep(2.0)
        after, _ = get(f"http://127.0.0.1:{port}/health")
        return (f"350 upgrade attempts in {took:.1f} s: {outcomes}; admin /health while full: "
                f"{admin_status} in {admin_took:.2f} s; public /health after they left: {after}")
    finally:
        b.terminate()
        b.wait(10)


def main():
    rport = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
    redis = f"redis://127.0.0.1:{rport}"
    nport, port, admin = free_port(), free_port(), free_port()
    node = spawn("switchboard-node", ["--listen", f"127.0.0.1:{nport}", "--redis", redis, "--node-id", "n1",
                                      "--advertise-url", f"http://127.0.0.1:{nport}"], "node.log")
    bal = spawn("switchboard-balancer", balancer_args(redis, port, admin), "balancer.log")
    procs = [redis_proc, node, bal]
    try:
        assert wait_http(f"http://127.0.0.1:{nport}/health") and wait_http(f"http://127.0.0.1:{admin}/health")
        time.sleep(1.5)
        with futures.ThreadPoolExecutor(max_workers=8) as pool:
            jobs = {
                "balancer: trickled second request head": pool.submit(trickled_second_head, "127.0.0.1", port),
                "node: trickled second request head": pool.submit(trickled_second_head, "127.0.0.1", nport),
                "balancer: connection that never sends": pool.submit(silent, "127.0.0.1", port),
                "node: connection that never sends": pool.submit(silent, "127.0.0.1", nport),
                "balancer: 40 KB request head": pool.submit(big_head, "127.0.0.1", port),
                "node: 40 KB request head": pool.submit(big_head, "127.0.0.1", nport),
                "balancer under 600 descriptors": pool.submit(descriptor_limit, redis),
            }
            status, body = get(f"http://127.0.0.1:{port}/metrics")
            print(f"public /metrics: {status}, {len(body)} bytes")
            status, body = get(f"http://127.0.0.1:{port}/nodes")
            urls = [n.get("url") for n in json.loads(body).get("available_nodes", [])] if status == 200 else body
            print(f"public /nodes: {status}, urls {urls}")
            help_text = subprocess.run([os.path.join(BIN, "switchboard-balancer"), "--help"],
                                       capture_output=True, text=True).stdout
            line = next((l.strip() for l in help_text.splitlines() if "Admin address" in l), "?")
            print(f"admin port default: {line}")
            for name, job in jobs.items():
                print(f"{name}: {job.result()}")
        # A wrong password: what each program's log says about it.
        bad = redis.replace("redis://", "redis://:wrong-secret@")
        n2port, b2port, b2admin = free_port(), free_port(), free_port()
        n2 = spawn("switchboard-node", ["--listen", f"127.0.0.1:{n2port}", "--redis", bad, "--node-id", "n2"],
                   "node-auth.log")
        b2 = spawn("switchboard-balancer", balancer_args(bad, b2port, b2admin), "balancer-auth.log")
        procs += [n2, b2]
        time.sleep(6)
        for name, log in [("node", "node-auth.log"), ("balancer", "balancer-auth.log")]:
            text = open(os.path.join(TMP, log), errors="replace").read()
            lines = [l for l in text.splitlines() if "uthentication" in l or "AUTH" in l or "refuses" in l]
            print(f"{name} with a wrong Redis password, 6 s: {len(lines)} log lines about it"
                  f"{'; e.g. ' + lines[0][-160:] if lines else ''}; password in log: {'wrong-secret' in text}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
