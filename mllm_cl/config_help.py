"""`train.py STAGE --help`: every setting of a config dataclass, with its default and its one line of help.

The help is the comment the field carries in `mllm_cl/config.py` (on its line, or the comment lines just
above it), so the settings are documented in one place. A nested dataclass (`train`, `eval`, an experiment's
per-stage TrainConfigs) is listed once under its dotted prefix.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import textwrap
from functools import cache
from typing import Any

_FIELD = re.compile(r"^    (\w+): [^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^    #\s?(.*)$")


@cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class body (its own line's, else the comment block just above)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        if (comment := _COMMENT.match(line)) is not None:
            pending.append(comment.group(1).strip())
        elif (match := _FIELD.match(line)) is not None and not line.lstrip().startswith(("def ", "@")):
            text = match.group(2) or " ".join(pending)
            if text:
                comments[match.group(1)] = text.strip()
            pending = []
        else:
            pending = []
    return comments


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def settings(config: Any, prefix: str = "", first: dict[type, str] | None = None) -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting of the dataclass instance `config` (its values are the defaults),
    nested dataclasses flattened with dots.

    A nested dataclass type met again (an experiment's five TrainConfigs) is listed by reference to the first,
    with the defaults in which it differs, not twice."""
    first = {} if first is None else first
    comments = field_comments(type(config))
    rows = []
    for f in dataclasses.fields(config):
        value, key, text = getattr(config, f.name), prefix + f.name, comments.get(f.name, "")
        if not dataclasses.is_dataclass(value):
            rows.append((key, _shown(value), text))
            continue
        kind = type(value)
        if kind in first:
            changed = {k: v for k, v in dataclasses.asdict(value).items() if v != getattr(kind(), k)}
            rows.append((f"{key}.*", _shown(changed) if changed else "",
                         f"{text + '; ' if text else ''}a {kind.__name__}: the keys of {first[kind]}.*; the defaults "
                         f"after '=' are those that differ from a {kind.__name__}'s"))
            continue
        first[kind] = key
        rows.append((f"{key}.*", "", text or f"the {kind.__name__} settings below"))
        rows.extend(settings(value, key + ".", first))
    return rows


def settings_help(cls: type, skip: tuple[str, ...] = ()) -> str:
    """The settings of `cls` (but those in `skip`) as text for argparse's epilog: each key with its default, then
    its help, indented and wrapped."""
    rows = [row for row in settings(cls()) if row[0] not in skip]
    lines = ["settings (key=value after the config file; the default after '='; nested keys with dots, lists "
             "as [a,b]):"]
    for key, default, text in rows:
        lines.append(f"  {key}" + (f" = {default}" if default else ""))
        lines.extend(textwrap.wrap(text, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
