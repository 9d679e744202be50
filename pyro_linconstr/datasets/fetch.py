"""Download-on-first-use of data that pyro_linconstr may not redistribute.

The chemical-process CSVs of KKT-hPINN state no licence, so they are not
shipped. On first use they are downloaded from their upstream repository at a
pinned commit (:data:`CHEMPROCESS_BASE_URL`), checked against a pinned SHA-256
(:data:`CHEMPROCESS_SHA256`) and kept in the user cache folder
(:func:`cache_dir`). Later uses read the cached copy (checked again, it is
cheap). Only the standard library is used (:mod:`urllib`).

* Cache folder: ``$PLC_CACHE_DIR`` when set, else
  ``$XDG_CACHE_HOME/pyro_linconstr`` or ``~/.cache/pyro_linconstr``
  (Windows: ``%LOCALAPPDATA%\\pyro_linconstr``).
* Offline: :class:`DownloadError` (a :class:`ConnectionError`) whose message
  names the URL, the cache path and the two ways round it: set
  ``PLC_DATA_DIR`` to a folder holding the files, or download them by hand
  into the cache folder.
* Corrupt download: :class:`ChecksumMismatchError`, naming the URL and both
  hashes; the bad file is deleted, never cached.

Both errors derive from :class:`DataFetchError` (a :class:`RuntimeError`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from http.client import HTTPException
from pathlib import Path
from urllib.request import Request, urlopen

#: Environment variable that overrides the cache folder.
CACHE_ENV_VAR = "PLC_CACHE_DIR"

#: Upstream repository of the chemical-process CSVs (H. Chen, G. E. Constante
#: Flores, C. Li, *Comput. Chem. Eng.* 189 (2024) 108764).
CHEMPROCESS_REPO = "li-group/KKThPINN"
#: The pinned commit (2024-12-05, "update requirements").
CHEMPROCESS_COMMIT = "8456d3c39668c9e4349fb7d220a2b81132f869bc"
#: Files are downloaded from ``CHEMPROCESS_BASE_URL + <path in the repository>``.
CHEMPROCESS_BASE_URL = f"https://raw.githubusercontent.com/{CHEMPROCESS_REPO}/{CHEMPROCESS_COMMIT}/"
#: ``path in the repository -> SHA-256`` of the files at the pinned commit.
CHEMPROCESS_SHA256: dict[str, str] = {
    "benchmark_CSTR.csv": "6bb786097961557fa1b75b1138ca95b705943811b36069169889656dccf9a037",
    "benchmark_plant.csv": "a3f4cc35bf73d9f54f43119f63aa6c30ccc74570703cd0a0862d0ed0643f42ef",
    "benchmark_distillation.csv": (
        "ae9ebfdb6c5b6ad3210a0ce4bd3226228af6351b2060fc682e4626d861afed1f"
    ),
}
#: Sub-folder of the cache that holds them.
CHEMPROCESS_SUBDIR = "chemprocess"

#: Seconds to wait for the server before giving up.
TIMEOUT_S = 60.0
_CHUNK = 1 << 16


class DataFetchError(RuntimeError):
    """A data file could not be fetched (base class of the two errors below)."""


class DownloadError(DataFetchError, ConnectionError):
    """The download failed (offline, HTTP error, unreachable host, unwritable cache)."""


class ChecksumMismatchError(DataFetchError):
    """The downloaded file's SHA-256 differs from the pinned one (it is not kept)."""


def cache_dir() -> Path:
    """The folder that caches downloaded data.

    ``$PLC_CACHE_DIR`` when set; else ``%LOCALAPPDATA%\\pyro_linconstr`` on
    Windows, ``$XDG_CACHE_HOME/pyro_linconstr`` or ``~/.cache/pyro_linconstr``
    elsewhere. The folder is not created here.

    Example::

        >>> from pyro_linconstr.datasets import cache_dir
        >>> cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/pyro_linconstr')
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "pyro_linconstr"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, target: Path, sha256: str, hint: str = "") -> Path:
    """Download ``url`` to ``target``, verifying its SHA-256.

    The bytes go to a temporary file beside ``target``; only when the hash
    matches is that file moved onto ``target`` (an atomic :func:`os.replace`),
    so ``target`` is never a partial or corrupt file.

    :param str hint: appended to the message of a :class:`DownloadError`.
    :raises DownloadError: when the URL cannot be read or the folder written.
    :raises ChecksumMismatchError: when the hash differs (the file is deleted).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
    except OSError as e:
        raise DownloadError(
            f"could not download {url}: cannot write the cache folder {target.parent} ({e}); "
            f"set {CACHE_ENV_VAR} to a writable folder.{hint}"
        ) from e
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            req = Request(url, headers={"User-Agent": "pyro_linconstr"})
            with urlopen(req, timeout=TIMEOUT_S) as resp:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
    except (OSError, HTTPException) as e:  # URLError, HTTPError, timeouts, disk full, ...
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: {e}{hint}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    actual = h.hexdigest()
    if actual != sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"SHA-256 mismatch for {url}: expected {sha256}, got {actual}. The file was not kept."
        )
    os.replace(tmp, target)
    return target


def fetch_chemprocess(fname: str) -> Path:
    """Path of a chemical-process CSV in the cache, downloading it on first use.

    :param str fname: one of the keys of :data:`CHEMPROCESS_SHA256`.
    :returns: ``cache_dir() / "chemprocess" / fname`` (its hash verified).
    :raises KeyError: for an unknown file.
    :raises DownloadError: when it is not cached and cannot be downloaded; the
        message names the URL, the cache path and the overrides.
    :raises ChecksumMismatchError: when the download is corrupt.

    A cached file whose hash is wrong (truncated, edited) is replaced by a
    fresh download, with a :class:`UserWarning`.
    """
    expected = CHEMPROCESS_SHA256[fname]
    target = cache_dir() / CHEMPROCESS_SUBDIR / fname
    if target.is_file():
        actual = sha256_of(target)
        if actual == expected:
            return target
        warnings.warn(
            f"cached {target} has SHA-256 {actual}, expected {expected}; downloading it again.",
            stacklevel=2,
        )
        target.unlink()
    url = CHEMPROCESS_BASE_URL + fname
    hint = (
        f"\nThe chemical-process data are not shipped with pyro_linconstr (no licence "
        f"upstream); they are downloaded once from {url} into {target}. Offline, either "
        f"set the environment variable PLC_DATA_DIR to a folder holding {fname} (or "
        f"chemprocess/{fname}), or download the file by hand into {target.parent} "
        f"(SHA-256 {expected}); {CACHE_ENV_VAR} moves the cache folder."
    )
    return download(url, target, expected, hint)
