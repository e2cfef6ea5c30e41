"""Reading the JSON files a user hands us (settings, model configs, indexes, cached scores): every way such a
file can be wrong (missing, not UTF-8, not JSON, nested past Python's recursion limit, the wrong kind of value)
becomes one error of the caller's class that names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, error: type[Exception], kind: type | None = None, what: str = "") -> Any:
    """The value in JSON file `path`, or `error(message)`; `kind` (dict, list): the type the top value must have,
    `what` how the message calls it (default: "a JSON object" / "a JSON list")."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be read (JSON arrays or objects thousands of levels deep)") \
            from None
    if kind is not None and not isinstance(value, kind):
        what = what or f"a JSON {'object' if kind is dict else kind.__name__}"
        raise error(f"{path} must hold {what}, not a {type(value).__name__}")
    return value
