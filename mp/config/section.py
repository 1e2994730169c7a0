"""`Section`: the checks the job config's sections share, with messages that name the key
(``section.key``), the value and the rule."""

from __future__ import annotations

from typing import ClassVar

from mp.config.coerce import ConfigError


class Section:
    """Checks shared by the sections; ``section`` names the section in messages."""

    section: ClassVar[str]

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def _at_least(self, name: str, low, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if value < low:
            raise ConfigError(f"{self._key(name)}={value!r} must be >= {low}")

    def _below_one(self, name: str) -> None:
        value = getattr(self, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{self._key(name)}={value!r} must be in [0, 1)")

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if value <= 0:
            raise ConfigError(f"{self._key(name)}={value!r} must be > 0")

    def _not_above(self, name: str, other: str) -> None:
        value, limit = getattr(self, name), getattr(self, other)
        if value > limit:
            raise ConfigError(f"{self._key(name)}={value!r} exceeds {self._key(other)}={limit!r}")

    def _one_of(self, name: str, allowed: tuple) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ConfigError(
                f"{self._key(name)}={value!r} must be one of {', '.join(map(repr, allowed))}"
            )
