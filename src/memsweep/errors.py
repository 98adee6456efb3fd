"""The one error type a user sees for bad input."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value that memsweep cannot use.

    The message is one line: the key, the value, and what is allowed.
    """

    def __init__(self, key: str, value: object, allowed: str | Iterable[object]):
        if not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: not allowed; allowed: {allowed}")
