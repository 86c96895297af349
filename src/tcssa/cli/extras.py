"""Optional dependencies of the commands: which extra of tcssa installs each, and the check for them."""

from __future__ import annotations

import importlib.util

#: Optional packages -> the extra of tcssa that installs them.
OPTIONAL_PACKAGES = {
    "transformers": "vlm",
    "peft": "vlm",
    "tokenizers": "vlm",
    "gguf": "vlm",
    "mil": "classic-mil",
}


class MissingExtraError(ImportError):
    """An optional dependency of a command is not installed; the message names the extra."""


def missing_extra(package: str, command: str | None = None) -> MissingExtraError:
    extra = OPTIONAL_PACKAGES[package]
    needs = f"`tcssa {command}` needs" if command else "this needs"
    return MissingExtraError(
        f'{needs} the optional package {package!r}, which is not installed: pip install "tcssa[{extra}]"'
    )


def require_extra(command: str, *packages: str) -> None:
    """Raise MissingExtraError naming the extra when one of ``packages`` cannot be imported."""
    for package in packages:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise missing_extra(package, command)
