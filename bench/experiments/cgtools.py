#!/usr/bin/env python3
"""Per-request views of callgrind profiles from callgrind.sh (not part of bench/run.sh or CI).

  cgtools.py diff A.out.1 REQUESTS_A B.out.1 REQUESTS_B [ROWS]
      self instructions per request of each function in A and in B, largest change first
  cgtools.py callers PROFILE.out.1 REQUESTS FUNCTION
      who calls FUNCTION (a substring of its name, e.g. __memcpy_avx_unaligned_erms), with the
      instructions (inclusive) and calls per request

REQUESTS is the count callgrind.sh printed for that profile. EVENT=DLmw (or any event the profile
recorded, e.g. with VGX="--cache-sim=yes --LL=1048576,16,64": D1mw, DLmr, ...) counts that event
instead of instructions.
"""
import os
import re
import subprocess
import sys

EVENT = os.environ.get("EVENT")


def annotate(path, *args):
    if EVENT:
        args = (f"--show={EVENT}", f"--sort={EVENT}", *args)
    return subprocess.run(["callgrind_annotate", *args, path], capture_output=True, text=True,
                          check=True).stdout


def self_costs(path, requests):
    costs, total = {}, None
    for line in annotate(path, "--threshold=100").splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)", line)
        if not m:
            continue
        cost = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in line:
            total = cost
        elif total is None or cost < 0.99 * total:
            # (Frames without symbols, `main` and the runtime's entry, carry the whole program.)
            costs[m.group(2).split(" [")[0]] = cost / requests
    return costs


def diff(a, na, b, nb, rows=40):
    x, y = self_costs(a, int(na)), self_costs(b, int(nb))
    names = sorted(set(x) | set(y), key=lambda k: -abs(y.get(k, 0) - x.get(k, 0)))
    for k in names[:int(rows)]:
        print(f"{x.get(k, 0):8.1f} {y.get(k, 0):8.1f} {y.get(k, 0) - x.get(k, 0):+7.1f}  {k[:120]}")


def callers(path, requests, function):
    n = int(requests)
    block = []
    for line in annotate(path, "--inclusive=yes", "--tree=caller").splitlines():
        if not line.strip():
            block = []
            continue
        if re.search(r"\*\s+\S*" + re.escape(function), line):
            rows = []
            for b in block:
                m = re.match(r"\s*([\d,]+) \([^)]*\)\s+<\s+(.+?)\s+\(([\d,]+)x\)", b)
                if m:
                    rows.append((int(m.group(1).replace(",", "")) / n,
                                 int(m.group(3).replace(",", "")) / n, m.group(2)))
            for cost, calls, name in sorted(rows, reverse=True):
                print(f"{cost:7.1f} {calls:5.1f}x  {name[:110]}")
            return
        block.append(line)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("diff", "callers"):
        sys.exit(__doc__)
    {"diff": diff, "callers": callers}[sys.argv[1]](*sys.argv[2:])
