"""TOML from users and files (build and search configs, target profiles, ``--set`` values).

``tomllib`` parses nested arrays and inline tables recursively, so a deeply nested value raises
RecursionError, and one just under Python's limit would make every later consumer (pydantic, JSON
hashing) recurse as deeply. Every parse therefore goes through :func:`parse_toml`, which turns
both into a one-line ConfigError and caps nesting at :data:`MAX_DEPTH`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_DEPTH = 32  # tables and arrays inside each other; real configs use 4 or 5


class NestedTooDeep(ConfigError):
    """A TOML document nests arrays or tables deeper than :data:`MAX_DEPTH`."""


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """The document ``text`` as a dict; ConfigError naming ``where`` when it is not valid TOML or
    nests deeper than :data:`MAX_DEPTH`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    except RecursionError:
        data = None
    if data is None or _depth(data) > MAX_DEPTH:
        raise NestedTooDeep(f"{where}: arrays or tables are nested more than {MAX_DEPTH} deep; flatten the value")
    return data


def read_toml(path: Path, what: str = "") -> dict[str, Any]:
    """:func:`parse_toml` of a UTF-8 file; ConfigError when it cannot be read."""
    where = f"{what} {path}".strip()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    return parse_toml(text, where)


def _depth(value: Any) -> int:
    """Nesting depth of dicts and lists, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:  # deeper is refused anyway: stop walking
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest
