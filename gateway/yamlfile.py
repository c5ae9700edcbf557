"""Reading a YAML file that must hold a mapping (configuration, load profiles), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """The file cannot be read, is not YAML, or does not hold a mapping; the message names the file."""


def read_yaml_mapping(path: Path, *, what: str) -> dict[str, Any]:
    """The mapping in ``path`` (empty for an empty file); ``what`` names it in errors ("a profile")."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise YamlFileError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise YamlFileError(f"{path}: malformed YAML: {exc}".replace("\n", " ")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise YamlFileError(f"{path}: {what} must be a mapping")
    return loaded
