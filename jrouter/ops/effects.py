"""Writing what the router asks to be written: message log lines and filter dumps.

Owns: carrying out ``routing.router`` effects (``LogMessage``, ``DumpPacket``)
against the file system, and telling the router when a dump file cannot be
written (it then stops dumping for that rule, as jabberd2 does).

Must not know: routing, sockets. The server runs ``EffectWriter.write`` when
the router says it has effects (``Router.on_effects``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jrouter.ops.message_log_file import MessageLog
from jrouter.routing.router import DumpPacket, LogMessage

if TYPE_CHECKING:
    from jrouter.routing.router import Log, Router


class EffectWriter:
    """The file side of one router."""

    def __init__(self, router: Router, log: Log) -> None:
        self.router = router
        self.log = log
        self._message_logs: dict[str, MessageLog] = {}  # path -> MessageLog

    def write(self) -> None:
        """Carry out every effect the router has queued, oldest first."""
        for effect in self.router.take_effects():
            if effect.__class__ is LogMessage:
                self._message_log(effect.path).append(effect.entry)
            elif effect.__class__ is DumpPacket:
                self._dump(effect)

    def _message_log(self, path: str) -> MessageLog:
        writer = self._message_logs.get(path)
        if writer is None:
            writer = self._message_logs[path] = MessageLog(path, self.log)
        return writer

    def _dump(self, effect: DumpPacket) -> None:
        try:
            with open(effect.path, "ab") as handle:
                handle.write(effect.data)
        except OSError as exc:
            self.router.dump_failed(effect.rule_index, effect.path, exc.strerror)
