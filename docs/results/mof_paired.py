"""Paired MAD differences against the projection, pooled over MOF tutorial logs.

``tutorials/mof_charges.py`` prints one line ``split K METHOD MAD X NLL/crystal Y ...``
per run. Runs of the same split start from the same network, so the difference
``MAD(method) - MAD(projection)`` on one split is a paired comparison. This
script pools those lines over several logs (for example a full run of splits
0-2 and a run of splits 3-9 with ``PLC_MOF_FIRST_SPLIT=3``) and prints, for
every method, the mean difference ± its standard error, the paired t
statistic, on how many splits the method beat the projection, and the mean ±
std MAD of both over those splits.

With ``PLC_MOF_ENSEMBLE=2`` the logs also print ``split K METHOD member J MAD X``
(member 0 is the single model) and ``split K METHOD ensemble of 2 MAD X``; an
ensemble is listed as ``METHOD_ens``, compared with the projection's ensemble
and with its own member 0, and its NLL per crystal is printed (the paper's
Table 19 gives the likelihood ensemble's). A split that appears in several logs
takes its value from the last log given.

``PATH:METHOD,METHOD`` takes only those methods' lines from a log (a log whose
other lines were made by an older definition, for example).

Usage::

    python docs/results/mof_paired.py docs/results/mof_charges_full.log \
        docs/results/mof_charges_splits3to9.log
    python docs/results/mof_paired.py --ensembles \
        docs/results/mof_charges_split0_ensembles.log:projection LOG ...
"""

import re
import statistics
import sys

LINE = re.compile(
    r"^split (\d+) (\w+)\s+(?:member (\d+) |ensemble of (\d+) )?MAD ([0-9.]+)"
    r"(?:\s+NLL/crystal\s+(-?[0-9.]+))?"
)


def _mean_std(values: list[float], digits: int = 4) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def read(paths: list[str]) -> tuple[dict, dict]:
    """``mad[key][split]`` and ``nll[key][split]``; key ``METHOD``, ``METHOD_ens``."""
    mad: dict[str, dict[int, float]] = {}
    nll: dict[str, dict[int, float]] = {}
    for spec in paths:
        path, _, only = spec.partition(":")
        keep = set(only.split(",")) if only else None
        with open(path) as f:
            for line in f:
                m = LINE.match(line)
                if not m or (m.group(3) is not None and m.group(3) != "0"):
                    continue
                if keep is not None and m.group(2) not in keep:
                    continue
                key = m.group(2) + ("_ens" if m.group(4) else "")
                split = int(m.group(1))
                mad.setdefault(key, {})[split] = float(m.group(5))
                if m.group(6) is not None:
                    nll.setdefault(key, {})[split] = float(m.group(6))
    return mad, nll


def main(argv: list[str]) -> None:
    ensembles = "--ensembles" in argv
    paths = [a for a in argv if a != "--ensembles"]
    mad, nll = read(paths)
    print(f"logs: {', '.join(paths)}")
    if not ensembles:
        _table(mad, "projection", "the projection")
    else:
        ens = {k: v for k, v in mad.items() if k.endswith("_ens")}
        _table(ens, "projection_ens", "the projection's ensemble of 2")
        _against_members(mad, nll)
    print("splits per method: " + ", ".join(f"{k} {sorted(v)}" for k, v in mad.items()))


def _table(mad: dict[str, dict[int, float]], baseline: str, title: str) -> None:
    base = mad[baseline]
    print(f"paired MAD difference against {title} (e)")
    print(
        f"{'method':16s} {'splits':>6s} {'mean diff':>10s} {'s.e.':>8s} {'t':>6s} {'better':>7s}"
        f"   {'MAD, method':>17s}   {'MAD, ' + baseline:>17s}"
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
            f"{method:16s} {len(d):6d} {mean:+10.5f} {se:8.5f} {t:6.2f} {wins:3d}/{len(d):<3d}"
            f"   {own:>17s}   {ref:>17s}"
        )


def _against_members(mad: dict, nll: dict) -> None:
    """Each ensemble against its own member 0 (the single model of the same log), and NLLs."""
    print("ensemble of 2 against its member 0 (the single model), and NLL per crystal")
    print(
        f"{'method':16s} {'splits':>6s} {'MAD, ensemble':>17s} {'MAD, member 0':>17s}"
        f" {'ens - member':>13s} {'better':>7s}   {'NLL, ensemble':>16s} {'NLL, member 0':>16s}"
    )
    for key, runs in mad.items():
        if not key.endswith("_ens"):
            continue
        method = key.removesuffix("_ens")
        single = mad.get(method, {})
        splits = sorted(set(runs) & set(single))
        if not splits:
            continue
        d = [runs[s] - single[s] for s in splits]
        wins = sum(x < 0 for x in d)
        n_ens = [nll[key][s] for s in splits if s in nll.get(key, {})]
        n_one = [nll[method][s] for s in splits if s in nll.get(method, {})]
        print(
            f"{key:16s} {len(splits):6d} {_mean_std([runs[s] for s in splits]):>17s}"
            f" {_mean_std([single[s] for s in splits]):>17s} {statistics.fmean(d):+13.5f}"
            f" {wins:3d}/{len(d):<3d}   {_mean_std(n_ens, 1):>16s} {_mean_std(n_one, 1):>16s}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
