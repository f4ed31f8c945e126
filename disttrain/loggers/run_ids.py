"""The small file that names a tracker's run, so that a resumed fit logs into the same run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from disttrain.storage.atomic import atomic_write_text

log = logging.getLogger("disttrain.loggers")


def read_run_file(path: Path) -> dict[str, Any]:
    """What ``write_run_file`` wrote, or ``{}`` (no file, or one that does not parse)."""
    try:
        found = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: unreadable (%s); a new run is started", path, err)
        return {}
    return found if isinstance(found, dict) else {}


def write_run_file(path: Path, entries: dict[str, Any]) -> None:
    atomic_write_text(path, yaml.safe_dump(entries, sort_keys=False))
