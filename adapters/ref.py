"""Adapter names and references (`name`, `name@3`, `name@stable`).

Names are validated here once, so no caller can build a path from an untrusted string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import AdapterValidationError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


def validate_name(name: str, what: str = "adapter name") -> str:
    """Return `name` if it matches NAME_PATTERN (no path separators, no `..`), else raise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}..."
        raise AdapterValidationError(
            f"invalid {what} {shown!r}: must match {NAME_PATTERN} (lowercase letters, digits, '.', '_', '-';"
            " at most 64 characters; no '..')"
        )
    return name


def validate_alias(alias: str) -> str:
    """An alias is a name that is not all digits (digits mean a version)."""
    validate_name(alias, "alias")
    if alias.isdigit():
        raise AdapterValidationError(
            f"invalid alias {alias!r}: an alias cannot be a number (that is a version)"
        )
    return alias


@dataclass(frozen=True)
class AdapterRef:
    """A reference to an adapter: a bare name, a pinned version or an alias (never both)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse "name", "name@3" or "name@stable"; raise AdapterValidationError when malformed."""
        if not isinstance(text, str):
            raise AdapterValidationError(f"invalid adapter reference {text!r}")
        name, sep, tag = text.partition("@")
        validate_name(name)
        if not sep:
            return cls(name)
        if tag.isdigit():
            version = int(tag)
            if version < 1:
                raise AdapterValidationError(f"invalid adapter reference {text!r}: versions start at 1")
            return cls(name, version=version)
        return cls(name, alias=validate_alias(tag))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name
