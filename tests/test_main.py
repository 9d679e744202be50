"""The demo ``python -m pyro_linconstr``: its options and a seconds-long run."""

import math
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def test_help_documents_the_options():
    out = subprocess.run(
        [sys.executable, "-m", "pyro_linconstr", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for option in ("--steps", "--seed"):
        assert option in out


def test_short_run_prints_the_comparison(capsys):
    from pyro_linconstr.__main__ import main

    rows = {r["name"]: r for r in main(["--steps", "30"])}
    mean, projected, conditioned, constrained = rows.values()
    assert list(rows) == [
        "unconstrained: mean",
        "unconstrained + plc.project",
        "unconstrained + plc.constrain",
        "constrained (LinearConstraint)",
    ]
    # Every prediction but the raw mean honours the law to float32 rounding, and so do its samples.
    for r in (projected, conditioned, constrained):
        assert r["max_residual"] < 1e-5
        assert r["off_law"] == 0.0
    assert mean["max_residual"] > 1e-2
    assert mean["off_law"] > 0.9
    # Densities on the law exist only for the conditioned Gaussians.
    assert mean["nll"] is None and projected["nll"] is None
    assert math.isfinite(conditioned["nll"]) and math.isfinite(constrained["nll"])
    for r in rows.values():
        assert 0.0 < r["rmse"] < 1.0
    out = capsys.readouterr().out
    for word in ("RMSE", "NLL on Ax=b", "max |Ax-b|", "off law", "plc.project"):
        assert word in out
