"""`Secret`: a credential that never shows itself by accident.

A bearer token, client secret, API key, DSN or Redis URL with a password is held as a
`Secret`. Every way of formatting it (`repr`, `str`, f-strings, `%s` in a log call, JSON
with `default=str`) prints `[secret]`; the value comes out only through an explicit
`.reveal()` (alias `.get_secret_value()`, pydantic's spelling), at the one place that hands
it to a library. Two secrets compare in constant time; a secret is never equal to a `str`.

Hand-written rather than pydantic's `SecretStr`: its repr is `SecretStr('**********')` and it
belongs to the validation layer, while this type is used below it (settings dataclasses,
clients) with no pydantic import.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final, NoReturn

from mcp_fhir._exceptions import ConfigError

__all__ = ["MASK", "Secret", "secret_from_env", "secret_from_file"]

MASK: Final = "[secret]"


class Secret:
    """A str-like wrapper whose every printed form is `[secret]`."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("Secret holds a str")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The plain value. Call it only where the value is handed to the library that uses it."""
        return self._value

    get_secret_value = reveal

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = (
            self._value.encode("utf-8", "surrogatepass"),
            other._value.encode("utf-8", "surrogatepass"),
        )
        return hmac.compare_digest(mine, theirs)

    def __hash__(self) -> int:
        return hash((Secret, len(self._value)))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret is not pickled")


def secret_from_env(name: str | None, key: str, *, environ: Mapping[str, str] | None = None) -> Secret:
    """The value of the environment variable `name` (named by settings key `key`); unset or empty fails."""
    env = os.environ if environ is None else environ
    value = env.get(name or "")
    if not name or not value:
        raise ConfigError(key, f"environment variable {name or '(none)'} is not set")
    return Secret(value)


def secret_from_file(path: str | os.PathLike[str], key: str, *, max_bytes: int = 64 * 1024) -> Secret:
    """The text of a secret file, without its trailing newline; unreadable or empty fails naming `key`."""
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {os.fspath(path)}: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(raw) > max_bytes:
        raise ConfigError(key, f"the file is larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(key, "the file is not UTF-8 text") from None
    if not text:
        raise ConfigError(key, "the file is empty")
    return Secret(text)
