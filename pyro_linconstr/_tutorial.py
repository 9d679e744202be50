"""Environment switches of the tutorials (private: not part of the public API).

Every script in ``tutorials/`` reads its settings through these functions, so
that one environment variable means the same thing in all of them:

* ``PLC_SMOKE``: :func:`smoke_mode` (quick run or full run);
* on/off switches such as ``PLC_VERBOSE``: :func:`env_flag`, same values;
* counts such as ``PLC_WORKERS`` or ``PLC_MOF_EPOCHS``: :func:`env_int`;
* subsets such as ``PLC_MOF_METHODS=likelihood,raza``: :func:`env_subset`;
* where a script writes its figures and tables: :func:`output_dir`.

A value that is not understood is an error that names the variable and the
accepted values, never a silent fallback to a default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["env_flag", "env_int", "env_subset", "output_dir", "smoke_mode"]

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """An on/off environment variable.

    ``1``, ``true``, ``yes``, ``on`` mean ``True``; ``0``, ``false``, ``no``,
    ``off`` mean ``False`` (case-insensitive, surrounding spaces ignored); unset
    or empty means ``default``.

    :param str name: the variable, e.g. ``"PLC_VERBOSE"``.
    :param bool default: the value when the variable is unset or empty.
    :param environ: the environment to read (default :data:`os.environ`).
    :raises ValueError: for any other value, naming the variable and the accepted values.

    Example::

        >>> env_flag("PLC_VERBOSE", environ={"PLC_VERBOSE": "Yes"})
        True
        >>> env_flag("PLC_VERBOSE", environ={})
        False
    """
    return _read_flag(name, default, environ, on="to switch it on", off="to switch it off")


def _read_flag(name, default, environ, on, off):
    raw = (os.environ if environ is None else environ).get(name, "")
    value = raw.strip().lower()
    if value == "":
        return default
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(
        f"{name}={raw!r} is not understood: use {', '.join(TRUE_VALUES)} {on}, "
        f"or {', '.join(FALSE_VALUES)} (or leave it unset) {off}."
    )


def smoke_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a tutorial runs in smoke mode (a quick run of a few minutes).

    Read from ``PLC_SMOKE`` with the rule of :func:`env_flag`: ``1``,
    ``true``, ``yes``, ``on`` (any case) select the smoke run; unset, empty,
    ``0``, ``false``, ``no``, ``off`` select the full run, which reproduces
    the published numbers and can take hours.

    :param environ: the environment to read (default :data:`os.environ`).
    :raises ValueError: for any other value, naming ``PLC_SMOKE`` and the accepted values.

    Example::

        >>> smoke_mode({"PLC_SMOKE": "1"}), smoke_mode({"PLC_SMOKE": "TRUE"})
        (True, True)
        >>> smoke_mode({}), smoke_mode({"PLC_SMOKE": "off"})
        (False, False)
        >>> smoke_mode({"PLC_SMOKE": "quick"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: PLC_SMOKE='quick' is not understood: use 1, true, yes, on for the smoke run, ...
    """
    return _read_flag(
        "PLC_SMOKE", False, environ, on="for the smoke run", off="for the full run (hours)"
    )


def env_int(
    name: str, default: int, minimum: int = 0, environ: Mapping[str, str] | None = None
) -> int:
    """An integer environment variable such as ``PLC_WORKERS``.

    :param str name: the variable.
    :param int default: the value when the variable is unset or empty.
    :param int minimum: the smallest value accepted.
    :param environ: the environment to read (default :data:`os.environ`).
    :raises ValueError: if the value is not a whole number ``>= minimum``.

    Example::

        >>> env_int("PLC_WORKERS", 2, minimum=1, environ={"PLC_WORKERS": " 4 "})
        4
        >>> env_int("PLC_WORKERS", 2, minimum=1, environ={})
        2
    """
    raw = (os.environ if environ is None else environ).get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={raw!r} is not understood: use a whole number >= {minimum}.")
    return value


def env_subset(
    name: str,
    choices: Iterable[str],
    environ: Mapping[str, str] | None = None,
    default: Iterable[str] | None = None,
) -> list[str]:
    """A comma-separated subset of ``choices``, such as ``PLC_MOF_METHODS=likelihood,raza``.

    :param str name: the variable.
    :param choices: the accepted names, in the order in which they are returned.
    :param environ: the environment to read (default :data:`os.environ`).
    :param default: the names returned when the variable is unset or empty
        (default: all of ``choices``), e.g. to leave an opt-in method out of a default run.
    :returns: the chosen names in the order of ``choices``; ``default`` when the
        variable is unset or empty.
    :raises ValueError: for a name that is not one of ``choices``.

    Example::

        >>> env_subset("PLC_MOF_METHODS", ["cr", "me", "raza"], {"PLC_MOF_METHODS": "raza, cr"})
        ['cr', 'raza']
        >>> env_subset("PLC_MOF_METHODS", ["cr", "me", "raza"], {}, default=["raza"])
        ['raza']
    """
    choices = list(choices)
    raw = (os.environ if environ is None else environ).get(name, "")
    picked = {s.strip() for s in raw.split(",") if s.strip()}
    if not picked:
        if default is None:
            return choices
        picked = set(default)
        unknown = sorted(picked.difference(choices))
        if unknown:
            raise ValueError(f"{name}: default name(s) {', '.join(unknown)} are not choices.")
    unknown = sorted(picked.difference(choices))
    if unknown:
        raise ValueError(
            f"{name}={raw!r}: unknown name(s) {', '.join(unknown)}; "
            f"choose from {', '.join(choices)} (comma-separated)."
        )
    return [c for c in choices if c in picked]


def output_dir(script: str | None) -> Path:
    """The folder ``output/`` beside a tutorial script, created if missing.

    :param script: the script's ``__file__``, or ``None`` where there is none
        (a notebook, a console, and sphinx-gallery, which runs an example
        without ``__file__`` from the example's own folder): ``./output``.
    :returns: the folder, which exists on return.

    Every tutorial writes its figures and result tables there, so that a run
    from any working directory, and the docs build, put them in
    ``tutorials/output/``::

        OUT = output_dir(globals().get("__file__"))

    Example::

        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> output_dir(str(root / "demo.py")) == root / "output"
        True
        >>> (root / "output").is_dir()
        True
    """
    out = Path(script).resolve().parent / "output" if script else Path("output")
    out.mkdir(parents=True, exist_ok=True)
    return out
