"""Paired MAD differences against the projection, pooled over MOF tutorial logs.

``tutorials/mof_charges.py`` prints one line ``split K METHOD MAD X ...`` per
run. Runs of the same split start from the same network, so the difference
``MAD(method) - MAD(projection)`` on one split is a paired comparison. This
script pools those lines over several logs (for example a full run of splits
0-2 and a run of splits 3-9 with ``PLC_MOF_FIRST_SPLIT=3``) and prints, for
every method, the mean difference ± its standard error, the paired t
statistic, on how many splits the method beat the projection, and the mean ±
std MAD of both over those splits. With ``PLC_MOF_ENSEMBLE=2`` the logs also
print ``split K METHOD member J MAD X`` (member 0 is the single model) and
``split K METHOD ensemble of 2 MAD X``; an ensemble is listed as
``METHOD_ens`` and is also compared with the projection's ensemble. A split
that appears in several logs takes its value from the last log given.

Usage::

    python docs/results/mof_paired.py docs/results/mof_charges_full.log \
        docs/results/mof_charges_splits3to9.log
"""

import re
import statistics
import sys

LINE = re.compile(r"^split (\d+) (\w+)\s+(?:member (\d+) |ensemble of (\d+) )?MAD ([0-9.]+)")


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(paths: list[str]) -> None:
    mad: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                m = LINE.match(line)
                if not m or (m.group(3) is not None and m.group(3) != "0"):
                    continue
                key = m.group(2) + ("_ens" if m.group(4) else "")
                mad.setdefault(key, {})[int(m.group(1))] = float(m.group(5))
    print(f"logs: {', '.join(paths)}")
    _table(mad, "projection", "the projection")
    if "projection_ens" in mad:
        ens = {k: v for k, v in mad.items() if k.endswith("_ens")}
        _table(ens, "projection_ens", "the projection's ensemble of 2")
    print("splits per method: " + ", ".join(f"{k} {sorted(v)}" for k, v in mad.items()))


def _table(mad: dict[str, dict[int, float]], baseline: str, title: str) -> None:
    base = mad[baseline]
    print(f"paired MAD difference against {title} (e)")
    print(
        f"{'method':14s} {'splits':>6s} {'mean diff':>10s} {'s.e.':>8s} {'t':>6s} {'better':>7s}"
        f"   {'MAD, method':>17s}   {'MAD, projection':>17s}"
    )
    for method, runs in mad.items():
        splits = sorted(set(runs) & set(base))
        if method == baseline or len(splits) < 2:
            continue
        d = [runs[s] - base[s] for s in splits]
        se = statistics.stdev(d) / len(d) ** 0.5
        mean = statistics.fmean(d)
        t = mean / se if se > 0 else float("nan")
        wins = sum(x < 0 for x in d)
        own = _mean_std([runs[s] for s in splits])
        ref = _mean_std([base[s] for s in splits])
        print(
            f"{method:14s} {len(d):6d} {mean:+10.5f} {se:8.5f} {t:6.2f} {wins:3d}/{len(d):<3d}"
            f"   {own:>17s}   {ref:>17s}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
