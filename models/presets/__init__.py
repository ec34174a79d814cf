"""Training presets shipped with the package: ``flowserve train --preset NAME --data SPEC``.

Each preset is a training config (``NAME.yaml`` beside this file) whose ``data`` the user replaces.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """The presets that ship with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def path(name: str) -> Path:
    """The YAML config of preset ``name``; a :class:`ConfigError` names the presets there are."""
    found = PRESETS_DIR / f"{name}.yaml"
    if name not in names():
        raise ConfigError(f"no preset {name!r}; presets: {', '.join(names())}")
    return found
