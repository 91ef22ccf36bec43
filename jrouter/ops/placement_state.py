"""Placement's state on disk: the slots instances hold, kept over a restart.

Owns: reading and writing ``placement.json`` in ``<clustering state-dir>``
(docs/jabberd2-router.md §6.10). Without it, a restarted router hands slots
out in reconnection order, so placement after a restart would depend on
which member happened to reconnect first.

The file is written whole and atomically (a temporary file in the same
directory, flushed to disk, then renamed over the old one), so a crash
leaves the old state or the new one, never half of one. A missing file is a
first start; an unreadable or malformed one is one log line and a fresh
start, never a crash.

Must not know: routing (it moves ``{name: {identity: slot}}``), sockets.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Mapping

FILE_NAME = "placement.json"
VERSION = 1

Slots = Mapping[str, Mapping[str, int]]


class PlacementState:
    """``placement.json`` in ``directory``."""

    def __init__(self, directory: str, warn: Callable[[str], None]) -> None:
        self.path = os.path.join(directory, FILE_NAME)
        self.warn = warn

    def load(self) -> dict[str, dict[str, int]]:
        """The saved slots, or {} (after a warning when the file is bad)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.warn(f"placement state {self.path} unreadable ({exc}): starting afresh")
            return {}
        slots = _valid(document)
        if slots is None:
            self.warn(f"placement state {self.path} is not a version {VERSION} state file: "
                      "starting afresh")
            return {}
        return slots

    def save(self, slots: Slots) -> bool:
        """Write ``slots``; False (after a warning) when it cannot."""
        directory = os.path.dirname(self.path)
        document = {"version": VERSION,
                    "slots": {name: dict(sorted(ids.items())) for name, ids in sorted(slots.items())}}
        try:
            os.makedirs(directory, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".placement.", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(document, handle, indent=1)
                    handle.write("\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                _unlink(temporary)
                raise
            _sync_directory(directory)
        except OSError as exc:
            self.warn(f"cannot save placement state to {self.path}: {exc}")
            return False
        return True


def _valid(document: object) -> dict[str, dict[str, int]] | None:
    if not isinstance(document, dict) or document.get("version") != VERSION:
        return None
    slots = document.get("slots")
    if not isinstance(slots, dict):
        return None
    valid: dict[str, dict[str, int]] = {}
    for name, ids in slots.items():
        if not isinstance(name, str) or not isinstance(ids, dict):
            return None
        if not all(isinstance(i, str) and type(s) is int and s >= 0 for i, s in ids.items()):
            return None
        valid[name] = dict(ids)
    return valid


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_directory(directory: str) -> None:
    """The rename itself survives a power cut once the directory is synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
