"""The shipped configuration files (model defaults, stages, schedules, demo settings), and
reading YAML configuration with errors that name the file.

`configs/` at the top of a source checkout links to this folder, so the commands in the
README (`jaxmusic train configs/stages/tiny.yaml ...`) work from a checkout, and an installed
package still finds its defaults here.
"""

from __future__ import annotations

from pathlib import Path

from jaxmusic.errors import UserError

ROOT = Path(__file__).resolve().parent


class ConfigError(UserError, ValueError):
    """A configuration file or override that cannot be used."""


def load_yaml(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return d
