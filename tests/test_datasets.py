"""Tests of the real-data loaders: shipped MOF data, fetched-and-cached chemical-process data.

Nothing here touches the network: every test runs with a private cache folder
and an upstream URL that points at a local folder (``file://``) or a local
HTTP server. The chemical-process tests that need the real CSVs read the
local copy in ``$PLC_DATA_DIR`` or ``../shared/data`` (skipped when absent).
"""

import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_linconstr
from pyro_linconstr.datasets import (
    CHEMPROCESS_BENCHMARKS,
    ChecksumMismatchError,
    DataFetchError,
    DownloadError,
    cache_dir,
    data_dir,
    fetch,
    load_chemprocess,
    load_mof_charges,
    mof_file,
    packaged_data_dir,
    split_crystals,
    split_rows,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MOF = packaged_data_dir() / "mof_charges.npz"
UPSTREAM_URL = fetch.CHEMPROCESS_BASE_URL  # before the autouse fixture redirects it


def _local_chemprocess() -> Path | None:
    """A local copy of the chemical-process CSVs, for the tests that need the real data."""
    candidates = [REPO.parent / "shared" / "data"]
    if os.environ.get("PLC_DATA_DIR"):
        candidates.insert(0, Path(os.environ["PLC_DATA_DIR"]))
    for root in candidates:
        for folder in (root / "chemprocess", root):
            if all((folder / f).is_file() for f in fetch.CHEMPROCESS_SHA256):
                return folder
    return None


LOCAL_CHEM = _local_chemprocess()
needs_chem = pytest.mark.skipif(LOCAL_CHEM is None, reason="no local copy of the chemprocess CSVs")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Every test: no PLC_DATA_DIR, a private cache, and an upstream that does not exist."""
    monkeypatch.delenv("PLC_DATA_DIR", raising=False)
    monkeypatch.setenv("PLC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "CHEMPROCESS_BASE_URL", (tmp_path / "no-upstream").as_uri() + "/")


@pytest.fixture
def downloads(monkeypatch):
    """Count the calls of ``urlopen`` made by the fetch module."""
    calls, real_urlopen = [], fetch.urlopen

    def counting_urlopen(req, *args, **kwargs):
        calls.append(req.full_url)
        return real_urlopen(req, *args, **kwargs)

    monkeypatch.setattr(fetch, "urlopen", counting_urlopen)
    return calls


@pytest.fixture
def fake_upstream(monkeypatch, tmp_path):
    """A local "upstream" holding small synthetic CSVs, with their hashes pinned."""
    up = tmp_path / "upstream"
    up.mkdir()
    pins = {}
    rng = np.random.default_rng(0)
    for fname, nx, _, B in CHEMPROCESS_BENCHMARKS.values():
        ncol = nx + len(B[0])
        rows = [",".join(f"c{j}" for j in range(ncol))]
        rows += [",".join(f"{v:.6f}" for v in rng.random(ncol)) for _ in range(4)]
        (up / fname).write_text("\n".join(rows) + "\n")
        pins[fname] = hashlib.sha256((up / fname).read_bytes()).hexdigest()
    monkeypatch.setattr(fetch, "CHEMPROCESS_SHA256", pins)
    monkeypatch.setattr(fetch, "CHEMPROCESS_BASE_URL", up.as_uri() + "/")
    return up


def _cache_files():
    folder = cache_dir() / fetch.CHEMPROCESS_SUBDIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def mof():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PLC_DATA_DIR", raising=False)
        return load_mof_charges()


# ---------------------------------------------------------------- paths
def test_no_default_folder_outside_the_package():
    assert data_dir() is None
    assert data_dir("/elsewhere").as_posix() == "/elsewhere"
    pkg = Path(pyro_linconstr.__file__).resolve().parent
    assert packaged_data_dir().is_relative_to(pkg)
    assert cache_dir() == Path(os.environ["PLC_CACHE_DIR"])


def test_env_var_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PLC_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir("/elsewhere").as_posix() == "/elsewhere"


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("PLC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform != "win32":
        assert cache_dir() == tmp_path / "xdg" / "pyro_linconstr"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert cache_dir() == Path.home() / ".cache" / "pyro_linconstr"


def test_missing_mof_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="mof_charges.npz.*PLC_DATA_DIR"):
        load_mof_charges(tmp_path)


def test_missing_chemprocess_file_is_clear(tmp_path, downloads):
    with pytest.raises(FileNotFoundError, match="benchmark_plant.csv.*PLC_DATA_DIR"):
        load_chemprocess("plant", tmp_path)
    with pytest.raises(KeyError, match="unknown benchmark"):
        load_chemprocess("reactor", tmp_path)
    assert downloads == []


def test_missing_file_via_env_var(monkeypatch, tmp_path, downloads):
    monkeypatch.setenv("PLC_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mof_charges()
    with pytest.raises(FileNotFoundError, match=r"nope.*PLC_DATA_DIR=.*nothing is downloaded"):
        load_chemprocess("cstr")
    assert downloads == []  # PLC_DATA_DIR set: never download


# ---------------------------------------------------------------- splits
@pytest.mark.parametrize("split,fracs", [(split_crystals, (7, 1, 2)), (split_rows, (6, 2, 2))])
def test_splits_partition_and_are_seeded(split, fracs):
    n = 1000
    tr, va, te = split(n, seed=3)
    assert (len(tr), len(va), len(te)) == tuple(100 * f for f in fracs)
    allidx = torch.cat([tr, va, te]).sort().values
    assert torch.equal(allidx, torch.arange(n))
    tr2, _, _ = split(n, seed=3)
    tr3, _, _ = split(n, seed=4)
    assert torch.equal(tr, tr2)
    assert not torch.equal(tr.sort().values, tr3.sort().values)
    with pytest.raises(ValueError, match="sum to 1"):
        split(n, fractions=(0.5, 0.1, 0.1))


# ---------------------------------------------------------------- MOF: shipped copy
def test_shipped_mof_is_found_without_plc_data_dir():
    assert mof_file() == SHIPPED_MOF
    assert SHIPPED_MOF.is_file()
    assert (packaged_data_dir() / "README-mof_charges.md").is_file()


def test_shipped_mof_matches_the_readme_sha256():
    readme = (packaged_data_dir() / "README-mof_charges.md").read_text(encoding="utf-8")
    stated = re.search(r"sha256 of this copy:\s*`([0-9a-f]{64})`", readme).group(1)
    assert fetch.sha256_of(SHIPPED_MOF) == stated
    assert "Licence: **MIT**" in readme and "Raza" in readme  # origin, licence, citation


def test_plc_data_dir_and_path_override_the_shipped_mof(monkeypatch, tmp_path):
    env, arg = tmp_path / "env", tmp_path / "arg"
    for d in (env, arg):
        d.mkdir()
        (d / "mof_charges.npz").write_bytes(b"")
    monkeypatch.setenv("PLC_DATA_DIR", str(env))
    assert mof_file() == env / "mof_charges.npz"
    assert mof_file(arg) == arg / "mof_charges.npz"
    assert mof_file(arg / "mof_charges.npz") == arg / "mof_charges.npz"


def test_mof_shapes(mof):
    C, N, E = 2266, 334103, 399032
    assert mof.num_crystals == C and mof.num_atoms == N
    assert mof.node_ptr.shape == (C + 1,) and mof.edge_ptr.shape == (C + 1,)
    assert mof.charge.dtype == torch.float64 and mof.charge.shape == (N,)
    assert mof.element.shape == (N,) and int(mof.element.max()) < 74 and int(mof.element.min()) >= 0
    assert mof.edge_index.shape == (2, 2 * E) and mof.edge_dist.shape == (2 * E,)
    assert mof.crystal.shape == (N,)
    assert torch.equal(torch.bincount(mof.crystal), torch.diff(mof.node_ptr))
    # directed edges stay within one crystal, both directions present, no self-loops
    src, dst = mof.edge_index
    assert torch.equal(mof.crystal[src], mof.crystal[dst])
    assert bool((src != dst).all())
    assert torch.equal(mof.edge_index[:, :E], mof.edge_index[:, E:].flip(0))
    assert float(mof.edge_dist.min()) > 0.4 and float(mof.edge_dist.max()) < 4.6
    assert mof.element_symbols[0] == "C"


def test_mof_charges_are_neutral_to_rounding(mof):
    net = mof.net_charge()
    # README: all crystals within 3.2e-5 e (labels are multiples of 1e-6 e)
    assert float(net.abs().max()) <= 3.2e-5 + 1e-12
    assert float(net.abs().max()) > 1e-5  # the raw labels are *not* exactly neutral
    q = mof.neutral_charge()
    assert float(mof.net_charge().abs().max()) == float(net.abs().max())  # unchanged
    neutral = torch.zeros(mof.num_crystals, dtype=torch.float64).index_add(0, mof.crystal, q)
    assert float(neutral.abs().max()) < 1e-12
    assert float((q - mof.charge).abs().max()) <= 3.2e-5


def test_mof_batch_matches_whole_graph(mof):
    crystals = [4, 0, 2265, 100]
    bt = mof.batch(crystals)
    n = int(sum(mof.node_ptr[c + 1] - mof.node_ptr[c] for c in crystals))
    assert bt["element"].shape == (n,) and int(bt["num_groups"]) == 4
    for k, c in enumerate(crystals):
        a, b = int(mof.node_ptr[c]), int(mof.node_ptr[c + 1])
        sel = bt["group"] == k
        assert torch.equal(bt["charge"][sel], mof.charge[a:b])
        assert torch.equal(bt["element"][sel], mof.element[a:b])
        assert torch.equal(bt["atom"][sel], torch.arange(a, b))
    src, dst = bt["edge_index"]
    assert torch.equal(bt["group"][src], bt["group"][dst])
    num_e = sum(int(mof.edge_ptr[c + 1] - mof.edge_ptr[c]) for c in crystals)
    assert bt["edge_index"].shape == (2, 2 * num_e) and bt["edge_dist"].shape == (2 * num_e,)
    # the local graph of crystal 0 (second in the batch) equals the README's reconstruction
    with np.load(SHIPPED_MOF) as z:
        e0, e1 = z["edge_ptr"][0], z["edge_ptr"][1]
        bonds = z["edges"][e0:e1].astype(np.int64)
    off = int(mof.node_ptr[5] - mof.node_ptr[4])
    k = int(mof.edge_ptr[5] - mof.edge_ptr[4])
    got = bt["edge_index"][:, k : k + len(bonds)] - off
    assert np.array_equal(got.numpy(), bonds.T)


# ---------------------------------------------------------------- chemprocess: fetch and cache
def test_first_use_downloads_and_caches_second_use_does_not(fake_upstream, downloads):
    d = load_chemprocess("plant")
    assert d.x.shape == (4, 4) and d.y.shape == (4, 5)
    assert downloads == [fake_upstream.as_uri() + "/benchmark_plant.csv"]
    cached = cache_dir() / "chemprocess" / "benchmark_plant.csv"
    assert cached.read_bytes() == (fake_upstream / "benchmark_plant.csv").read_bytes()
    assert _cache_files() == ["benchmark_plant.csv"]  # no temporary file left behind
    (fake_upstream / "benchmark_plant.csv").unlink()  # the cache alone now serves it
    d2 = load_chemprocess("plant")
    assert len(downloads) == 1
    assert torch.equal(d.x, d2.x) and torch.equal(d.y, d2.y)


def test_checksum_mismatch_raises_and_caches_nothing(fake_upstream, monkeypatch):
    good = fetch.CHEMPROCESS_SHA256["benchmark_CSTR.csv"]
    wrong = "0" * 64
    monkeypatch.setitem(fetch.CHEMPROCESS_SHA256, "benchmark_CSTR.csv", wrong)
    with pytest.raises(ChecksumMismatchError) as err:
        load_chemprocess("cstr")
    msg = str(err.value)
    assert wrong in msg and good in msg
    assert fake_upstream.as_uri() + "/benchmark_CSTR.csv" in msg
    assert isinstance(err.value, DataFetchError)
    assert _cache_files() == []


def test_corrupt_cache_is_downloaded_again(fake_upstream, downloads):
    load_chemprocess("cstr")
    cached = cache_dir() / "chemprocess" / "benchmark_CSTR.csv"
    cached.write_text("truncated")
    with pytest.warns(UserWarning, match="downloading it again"):
        load_chemprocess("cstr")
    assert len(downloads) == 2
    assert cached.read_bytes() == (fake_upstream / "benchmark_CSTR.csv").read_bytes()


def test_unreachable_upstream_names_url_cache_and_overrides(downloads):
    url = fetch.CHEMPROCESS_BASE_URL + "benchmark_distillation.csv"
    with pytest.raises(DownloadError) as err:
        load_chemprocess("distillation")
    msg = str(err.value)
    assert isinstance(err.value, ConnectionError) and isinstance(err.value, DataFetchError)
    assert url in msg and "PLC_DATA_DIR" in msg and "PLC_CACHE_DIR" in msg
    assert str(cache_dir() / "chemprocess") in msg
    assert fetch.CHEMPROCESS_SHA256["benchmark_distillation.csv"] in msg
    assert downloads == [url]
    assert _cache_files() == []


def test_download_over_http(fake_upstream, monkeypatch, downloads):
    """The same path through a real (local) HTTP server: 200 is cached, 404 is a DownloadError."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(fake_upstream), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        monkeypatch.setattr(fetch, "CHEMPROCESS_BASE_URL", base)
        assert load_chemprocess("plant").y.shape == (4, 5)
        (fake_upstream / "benchmark_CSTR.csv").unlink()
        with pytest.raises(DownloadError, match=re.escape(base + "benchmark_CSTR.csv")):
            load_chemprocess("cstr")
    finally:
        server.shutdown()
        server.server_close()
    assert _cache_files() == ["benchmark_plant.csv"]
    assert len(downloads) == 2


def test_pinned_upstream_is_a_full_commit():
    assert re.fullmatch(r"[0-9a-f]{40}", fetch.CHEMPROCESS_COMMIT)
    assert UPSTREAM_URL == (
        f"https://raw.githubusercontent.com/li-group/KKThPINN/{fetch.CHEMPROCESS_COMMIT}/"
    )
    files = {f for f, *_ in CHEMPROCESS_BENCHMARKS.values()}
    assert set(fetch.CHEMPROCESS_SHA256) == files


# ---------------------------------------------------------------- chemprocess: the real data
@needs_chem
def test_pinned_sha256_match_the_local_copy():
    for fname, sha in fetch.CHEMPROCESS_SHA256.items():
        assert fetch.sha256_of(LOCAL_CHEM / fname) == sha, fname


@pytest.fixture
def real_upstream(monkeypatch):
    """The real CSVs served from the local copy through the download path."""
    if LOCAL_CHEM is None:
        pytest.skip("no local copy of the chemprocess CSVs")
    monkeypatch.setattr(fetch, "CHEMPROCESS_BASE_URL", LOCAL_CHEM.as_uri() + "/")


STATED = {"cstr": (1943, 3, 3, 2, 2.0e-9), "plant": (1541, 4, 5, 1, 3.8e-7)}
STATED["distillation"] = (6482, 5, 10, 2, 2.4e-9)


@pytest.mark.parametrize("name", sorted(CHEMPROCESS_BENCHMARKS))
def test_chemprocess_shapes_and_mass_balance(name, real_upstream):
    rows, nx, ny, m, resid = STATED[name]
    d = load_chemprocess(name)
    assert d.x.shape == (rows, nx) and d.y.shape == (rows, ny)
    assert d.A.shape == (m, nx) and d.B.shape == (m, ny)
    assert len(d.columns) == nx + ny
    rel = d.relative_residual()
    assert rel.shape == (rows, m)
    # the stated largest relative residual, to the 2 digits the README gives
    assert float(rel.max()) <= resid * 1.05
    assert float(rel.max()) >= resid * 0.5  # the check is not vacuous


@pytest.mark.parametrize("name", sorted(CHEMPROCESS_BENCHMARKS))
def test_chemprocess_scaling_keeps_the_law_linear(name, real_upstream):
    d = load_chemprocess(name)
    xs, ys = d.x_scaled, d.y_scaled
    assert float(xs.abs().max()) == 1.0 and float(ys.abs().max()) == 1.0
    lhs = ys @ d.B_scaled.T
    rhs = d.rhs(xs)
    assert lhs.shape == rhs.shape == (d.x.shape[0], d.A.shape[0])
    # the scaled system holds to the same relative residual as the raw data
    scale = xs.abs() @ d.A_scaled.abs().T + ys.abs() @ d.B_scaled.abs().T
    rel = (lhs - rhs).abs() / scale
    assert float(rel.max()) <= float(d.relative_residual().max()) + 1e-14


@needs_chem
def test_plc_data_dir_serves_chemprocess_without_download(monkeypatch, downloads):
    monkeypatch.setenv("PLC_DATA_DIR", str(LOCAL_CHEM.parent))
    assert load_chemprocess("plant").x.shape == (1541, 4)
    monkeypatch.setenv("PLC_DATA_DIR", str(LOCAL_CHEM))  # the CSVs' own folder works too
    assert load_chemprocess("cstr").x.shape == (1943, 3)
    assert downloads == [] and _cache_files() == []


# ---------------------------------------------------------------- the built wheel
def test_wheel_ships_the_mof_data_and_finds_it_when_installed(tmp_path):
    """Build a wheel from a copy of the sources; it holds the npz, its README and the
    licence, and, unpacked outside any checkout, loads the MOF data with no PLC_DATA_DIR."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / f, src / f)
    shutil.copytree(
        REPO / "pyro_linconstr",
        src / "pyro_linconstr",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + [str(src), "-w", str(out)],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (wheel,) = out.glob("pyro_linconstr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "pyro_linconstr/datasets/data/mof_charges.npz" in names
        assert "pyro_linconstr/datasets/data/README-mof_charges.md" in names
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
        assert not any(n.endswith(".csv") for n in names)  # not redistributed
        npz = z.read("pyro_linconstr/datasets/data/mof_charges.npz")
        assert npz == SHIPPED_MOF.read_bytes()
        site = tmp_path / "site"
        z.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "PLC_DATA_DIR"}
    env["PYTHONPATH"] = str(site)
    code = (
        "import pyro_linconstr.datasets as d; p = d.mof_file(); "
        f"assert p.is_relative_to({str(site)!r}), p; "
        "print(d.load_mof_charges().num_crystals)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2266"
