"""The demo ``python -m pyro_linconstr``: its options and a seconds-long run."""

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
    for option in ("--epochs", "--seed", "--out", "--quick", "--max-steps", "--particles"):
        assert option in out


def test_tiny_run_prints_table_and_residuals(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "samples.png"
    from pyro_linconstr.__main__ import main

    result = main(
        ["--quick", "--max-steps", "3", "--num-test", "40", "--no-progress", "--out", str(png)]
    )
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"unconstrained", "projection", "constrained"}
    # Constrained samples honour the law to rounding; unconstrained ones do not.
    assert rows["constrained"]["violation"] == 0.0
    assert rows["constrained"]["res_max"] < 1e-4
    assert rows["projection"]["res_max"] < 1e-4
    assert rows["unconstrained"]["violation"] > 0.5
    assert png.is_file() and png.stat().st_size > 1000
    out = capsys.readouterr().out
    for word in ("unconstrained", "projection", "constrained", "violation", "|Ax-b|", "test LL"):
        assert word in out
