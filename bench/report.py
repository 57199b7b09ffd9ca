"""Tables of bench/run.sh: stdin has one line per (workload.server):
"key iops_sum cpu_sum n peak_rss_kib". SERVERS and SIZE come from the
environment. Every goal is a ratio against its peer in the same run."""
import os
import sys

rows = {}
for line in sys.stdin:
    k, iops, cpu, n, rss = line.split()
    wl, s = k.split(".", 1)
    rows.setdefault(wl, {})[s] = (float(iops) / int(n), float(cpu) / int(n), int(rss))
servers = os.environ.get("SERVERS", "").split()
size = int(os.environ.get("SIZE", "0"))
names = {"randwrite": "4k randwrite QD32", "randread": "4k randread QD32",
         "seqwrite": "1M seq write QD8", "flushqd1": "4k write+flush QD1",
         "flush8j": "4k write+flush 8 jobs", "mixed": "4k 70/30 read/write QD32, flush every 32 writes"}
order = [w for w in ["randwrite", "randread", "seqwrite", "flushqd1", "flush8j", "mixed"] if w in rows]


def g(wl, s):
    return rows.get(wl, {}).get(s, (0.0, 0.0, 0))


hdr = "| workload | " + " | ".join(f"{s} IOPS" for s in servers) + " | raw file |"
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
for wl in order:
    cells = " | ".join(f"{g(wl, s)[0]:.0f}" for s in servers)
    raw = f"{g(wl, 'raw')[0]:.0f}" if wl == "flushqd1" else ""
    print(f"| {names[wl]} | {cells} | {raw} |")
print()
hdr = "| server CPU µs per I/O | " + " | ".join(servers) + " |"
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
for wl in order:
    print(f"| {names[wl]} | " + " | ".join(f"{g(wl, s)[1]:.1f}" for s in servers) + " |")
print()

# The goals: (workload, what, subject, peer, kind, goal); kind "iops" wants
# subject/peer >= goal, "cpu" wants subject/peer <= goal.
who = "blockd" if "blockd" in servers else "nbdfile"
goals = [
    ("randwrite", "IOPS", who, "nbdfile", "iops", 0.85),
    ("randwrite", "IOPS", who, "nbdkit", "iops", 1.2),
    ("randwrite", "CPU per write", who, "nbdkit", "cpu", 0.8),
    ("randwrite", "CPU per write (engine over the protocol layer)", who, "nbdfile", "cpu", 1.15),
    ("seqwrite", "IOPS", who, "nbdkit", "iops", 1.0),
    ("randread", "IOPS", who, "nbdkit", "iops", 1.1),
    ("flushqd1", "IOPS", who, "raw", "iops", 0.8),
    ("flushqd1", "IOPS", who, "nbdkit", "iops", 1.3),
    ("flush8j", "IOPS", who, "nbdkit", "iops", 2.0),
    ("mixed", "IOPS", who, "nbdkit", "iops", 1.2),
]
print("| goal | workload | " + who + " | peer | ratio | goal | |")
print("|---|---|---|---|---|---|---|")
for wl, what, subj, peer, kind, goal in goals:
    if wl not in rows or peer not in rows[wl] or subj not in rows[wl]:
        continue
    i = 1 if kind == "cpu" else 0
    a, b = g(wl, subj)[i], g(wl, peer)[i]
    if b == 0:
        continue
    r = a / b
    ok = r <= goal if kind == "cpu" else r >= goal
    rel = "<=" if kind == "cpu" else ">="
    print(f"| {what} | {names[wl]} | {a:.1f} | {peer} {b:.1f} | {r:.2f}x | {rel} {goal}x | {'met' if ok else 'MISSED'} |")
print()
if "blockd" in servers and "blockd-base" in servers:
    # A before/after pair in the same run (BLOCKD_BASE_BIN).
    print("| blockd against blockd-base (same run) | blockd IOPS | blockd-base IOPS | IOPS ratio | blockd CPU µs/IO | blockd-base CPU µs/IO | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for wl in order:
        (a, ac, _), (b, bc, _) = g(wl, "blockd"), g(wl, "blockd-base")
        if b and bc:
            print(f"| {names[wl]} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {ac:.1f} | {bc:.1f} | {ac / bc:.2f}x |")
    print()
if "randwrite" in rows:
    for s in servers:
        rss = g("randwrite", s)[2]
        if rss:
            line = f"peak RSS during 4k randwrite QD32, {s}: {rss / 1024:.0f} MiB (export {size / (1 << 30):.0f} GiB)"
            if s == "blockd":
                line += "; goal <= 150 MiB with a 10 GiB volume (SIZE=$((10 << 30)))"
            print(line)
