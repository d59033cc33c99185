"""Command-line flags generated from a config dataclass (`--group_size=8`), shared by train.py and sample.py.

Each field becomes one flag of the field's type; the trailing comment on the field's line in the source
becomes its help text, so the config block stays the single place that documents an option. An unknown
flag or a value of the wrong type ends with one message (argparse's usage error, exit 2), never a traceback.
`fields` limits the flags to the ones a job uses (sample.py's jobs share one dataclass); the others keep
their defaults and are not in --help.

It does not: read config files or environment variables, or check values (each script's check_config).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing


def _field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of the dataclass source -> {name: comment}."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#(.*)$", src, re.M)}


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _scalar_type(tp):
    """int | None -> int, Optional[str] -> str; bools get a strict parser."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return _parse_bool if base is bool else base


def _nullable(conv):
    return lambda s: None if s.lower() in ("none", "null", "") else conv(s)


def parse_flags(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None,
                fields: set[str] | None = None):
    """Build `cls` (a dataclass) from `--field=value` flags; defaults come from the dataclass. With
    `fields`, only those fields are flags."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        tp = hints[f.name]
        conv = _scalar_type(tp)
        if type(None) in typing.get_args(tp):
            conv = _nullable(conv)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(f"--{f.name}", type=conv, default=default, help=comments.get(f.name, ""))
    return cls(**vars(parser.parse_args(argv)))
