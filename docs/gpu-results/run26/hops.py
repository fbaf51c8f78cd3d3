"""Per-hop gap percentiles of the token path from jitprobe files: for each stage, the gaps
between consecutive marks of one key (worker step: one key; flush/sched: per gateway;
r/y: per request), and each stage's p99 over the worker step's."""
import collections, glob, sys
d = sys.argv[1]
marks = collections.defaultdict(lambda: collections.defaultdict(list))
for f in glob.glob(f"{d}/*.txt"):
    for line in open(f):
        t, stage, key, n = line.split()
        marks[stage][key].append(float(t))
pc = lambda g, p: g[min(len(g) - 1, int(p / 100 * len(g)))]
out = {}
for stage in ("step", "flush", "sched", "r", "y"):
    g = sorted(1000 * (b - a) for ts in marks[stage].values() for a, b in zip(sorted(ts), sorted(ts)[1:]))
    g = [x for x in g if x < 100]
    if not g:
        continue
    out[stage] = [pc(g, p) for p in (50, 90, 99, 99.9)]
    print(f"{stage:>6}: {len(g):7d} gaps, ms p50/90/99/99.9 " + " / ".join(f"{x:.2f}" for x in out[stage]))
