#!/usr/bin/env python3
"""Mixed streaming and non-streaming traffic through a behest-agent proxy for a fixed time.

Usage: soak.py BASE_URL SECONDS WORKERS
Prints one JSON line: {"requests", "errors", "streams", "by_status"}. Standard library only.
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse

base, seconds, workers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
url = urllib.parse.urlparse(base)
deadline = time.monotonic() + seconds
lock = threading.Lock()
totals = {"requests": 0, "errors": 0, "streams": 0, "by_status": {}}
first_errors = []


def record(status, ok, stream=False):
    with lock:
        totals["requests"] += 1
        totals["streams"] += int(stream)
        totals["by_status"][str(status)] = totals["by_status"].get(str(status), 0) + 1
        if not ok:
            totals["errors"] += 1


def worker(n):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    i = 0
    while time.monotonic() < deadline:
        i += 1
        kind = i % 3
        try:
            if kind == 0:
                conn.request("GET", url.path + "/models", headers={"Authorization": "Bearer placeholder"})
                r = conn.getresponse()
                body = r.read()
                record(r.status, r.status == 200 and b"echo-1" in body)
            else:
                stream = kind == 2
                payload = json.dumps({"model": "echo-1", "stream": stream,
                                      "messages": [{"role": "user", "content": f"soak {n} {i}"}]})
                conn.request("POST", url.path + "/chat/completions", body=payload,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                ok = r.status == 200 and (b"data: [DONE]" in body if stream else b"chat.completion" in body)
                record(r.status, ok, stream)
                if not ok and len(first_errors) < 5:
                    first_errors.append(f"{r.status} {body[:200]!r}")
        except Exception as e:  # a connection error is an error, and a new connection
            record(0, False)
            if len(first_errors) < 5:
                first_errors.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)


threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
totals["first_errors"] = first_errors
print(json.dumps(totals))
