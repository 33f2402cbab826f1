"""Settings declared once: a field of a settings dataclass carries its default, its help and the paper's value.

The config sections (:class:`ragr1_verl.config.RagR1Config`, :class:`ragr1_verl.retrieval_client.RetrieverSettings`)
declare their fields with :func:`setting`; the configuration reference in the docs is generated from them
(:func:`documented`), and the command lines take a flag's default and help from the field it sets
(:func:`add_setting_argument`), under the field's own name. A flag renamed to match its field keeps its old
name as an alias that still works and warns (:class:`DeprecatedFlag`).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

NOT_IN_PAPER = "none"  # the paper's value of a setting the paper has no counterpart for
_HELP, _PAPER, _KEY, _SHOWN_DEFAULT = "help", "paper", "key", "shown_default"


def setting(default: Any = dataclasses.MISSING, *, help: str, paper: Any = NOT_IN_PAPER,
            default_factory: Any = dataclasses.MISSING, key: str | None = None,
            shown_default: str | None = None) -> Any:
    """A dataclass field with its documentation. ``key``: the name in the config file when it differs from
    the field's; ``shown_default``: the default as the reference shows it, when the value itself is computed."""
    metadata = {_HELP: help, _PAPER: paper, _KEY: key, _SHOWN_DEFAULT: shown_default}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class SettingDoc:
    """One row of a configuration reference."""

    key: str
    default: str
    paper: str
    help: str


def _field(cls: type, name: str) -> dataclasses.Field:
    for candidate in dataclasses.fields(cls):
        if candidate.name == name:
            return candidate
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def setting_help(cls: type, name: str) -> str:
    return _field(cls, name).metadata[_HELP]


def setting_default(cls: type, name: str) -> Any:
    field = _field(cls, name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def shown(value: Any) -> str:
    """A value as the reference and ``--help`` show it: YAML spelling (null, true), integers without ``.0``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def documented(cls: type, prefix: str = "") -> list[SettingDoc]:
    """The reference rows of a settings class, in declaration order; a field without help (a nested section)
    is left to its own class's rows."""
    rows = []
    for field in dataclasses.fields(cls):
        if _HELP not in field.metadata:
            continue
        default = field.metadata[_SHOWN_DEFAULT]
        if default is None:
            value = field.default if field.default is not dataclasses.MISSING else None
            default = shown(value)
        rows.append(SettingDoc(prefix + (field.metadata[_KEY] or field.name), default,
                               shown(field.metadata[_PAPER]), field.metadata[_HELP]))
    return rows


def reference_table(rows: Sequence[SettingDoc]) -> str:
    """The rows as a Markdown table (key, default, paper, meaning)."""
    lines = ["| key | default | paper | meaning |", "|---|---|---|---|"]
    for row in rows:
        cells = (f"`{row.key}`", f"`{row.default}`", row.paper, row.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


class DeprecatedFlag(argparse.Action):
    """An old flag name kept as an alias: it sets the same value as ``replacement`` and warns once used."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated and will be removed; use {self.replacement}", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


def add_setting_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, name: str, *,
                         flag: str | None = None, deprecated: Sequence[str] = (), help_prefix: str = "",
                         help_suffix: str = "", **kwargs: Any) -> argparse.Action:
    """``--<name-with-dashes>`` for setting ``name`` of ``cls``: its default (unless ``default`` is given, e.g.
    None for "the protocol decides") and help come from the field. ``deprecated``: old flag names that still
    work and warn."""
    flag = flag or "--" + name.replace("_", "-")
    kwargs.setdefault("default", setting_default(cls, name))
    help_text = " ".join(part for part in (help_prefix, setting_help(cls, name), help_suffix) if part)
    action = parser.add_argument(flag, dest=name, help=help_text, **kwargs)
    for old in deprecated:
        parser.add_argument(old, dest=name, action=DeprecatedFlag, replacement=flag, type=kwargs.get("type"),
                            help=argparse.SUPPRESS)
    return action
