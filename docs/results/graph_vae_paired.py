"""Paired differences ``ours - baseline``, pooled over graph VAE tutorial logs.

``tutorials/graph_vae.py`` prints one line per run::

    split K METHOD LL/crystal X  KL Y  MAD Z  sd W  90% cover C  max|net| V  (...)

Runs of the same split start from the same networks, so on one split the
difference between ours and a baseline is a paired comparison. This script
pools those lines over several logs (for example the full run of splits 0-1
and a run of split 2 with ``PLC_GVAE_FIRST_SPLIT=2``) and prints, for every
baseline and metric, the mean difference ± its standard error, the paired t
statistic and on how many splits ours is better (higher LL, lower MAD,
coverage closer to 0.90), then mean ± std of every method. A split that
appears in several logs takes its value from the last log given.

Usage::

    python docs/results/graph_vae_paired.py docs/results/graph_vae_full.log \
        docs/results/graph_vae_full_split2.log
"""

import re
import statistics
import sys

LINE = re.compile(
    r"^split (\d+) (\w+)\s+LL/crystal\s+(-?[0-9.]+)\s+KL\s+[0-9.]+\s+MAD ([0-9.]+)\s+"
    r"sd [0-9.]+\s+90% cover ([0-9.]+)"
)
METRICS = (  # name, how a run is scored, whether larger differences are better
    ("LL/crystal", lambda r: r[0], True),
    ("MAD (e)", lambda r: r[1], False),
    ("|cover - 0.9|", lambda r: abs(r[2] - 0.9), False),
)


def main(paths: list[str]) -> None:
    runs: dict[str, dict[int, tuple[float, float, float]]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                m = LINE.match(line)
                if m:
                    split, method = int(m.group(1)), m.group(2)
                    values = (float(m.group(3)), float(m.group(4)), float(m.group(5)))
                    runs.setdefault(method, {})[split] = values
    print(f"logs: {', '.join(paths)}")
    ours = runs["ours"]
    print(f"{'ours - baseline':28s} {'splits':>6s} {'mean diff':>10s} {'s.e.':>8s} {'t':>6s}")
    for method, by_split in runs.items():
        if method == "ours":
            continue
        splits = sorted(set(by_split) & set(ours))
        if len(splits) < 2:
            continue
        for name, score, larger_better in METRICS:
            d = [score(ours[s]) - score(by_split[s]) for s in splits]
            mean, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
            t = mean / se if se > 0 else float("inf")
            wins = sum((x > 0) if larger_better else (x < 0) for x in d)
            print(
                f"{method + ', ' + name:28s} {len(splits):6d} {mean:+10.5f} {se:8.5f} {t:+6.1f}"
                f"  ours better on {wins}/{len(splits)}"
            )
    print("\nmean ± std over splits")
    for method, by_split in runs.items():
        cols = []
        for name, score, _ in METRICS:
            v = [score(by_split[s]) for s in sorted(by_split)]
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            cols.append(f"{name} {statistics.fmean(v):.4f} ± {sd:.4f}")
        print(f"{method:14s} splits {sorted(by_split)}: " + "; ".join(cols))


if __name__ == "__main__":
    main(sys.argv[1:] or ["docs/results/graph_vae_full.log"])
