"""The message log file (protocol §7.1): one open, append and close per message.

Owns: the file jabberd2's ``<message_logging>`` names: appending a line, the
three header lines and mode 0600 for a file that did not exist, and the
error lines when it cannot be written. Opening it for each message, as
jabberd2 does, lets logrotate move the file at any time.

Must not know: routing. Which routes are logged and what a line says is
``routing/message_log.py``; the router hands entries over as effects.
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING, Callable, Optional

from jrouter.routing.message_log import FILE_MODE, HEADER, Entry, entry_for, format_line

if TYPE_CHECKING:
    from jrouter.routing.router import Log
    from jrouter.wire.xmlstream import Element


class MessageLog:
    """The message log file: appended to, one open and close per message.

    ``log`` (anything with ``.error(text)``) hears about files that cannot be
    written, with jabberd2's wording; routing goes on either way.
    """

    def __init__(self, path: str, log: Optional[Log] = None,
                 localtime: Callable[[], time.struct_time] = time.localtime) -> None:
        self.path = path
        self.log = log
        self.localtime = localtime

    def log_route(self, element: Element) -> bool:
        """Log a delivered route (``xmlstream.Element``) if jabberd2 would;
        return whether a line was written."""
        logged = entry_for(element)
        return logged is not None and self.append(logged)

    def append(self, logged: Entry) -> bool:
        """Write one entry, stamped with the local time now."""
        return self.write(format_line(logged, self.localtime()))

    def write(self, line: str) -> bool:
        """Append ``line``; a new file gets the header and mode 0600 first."""
        data = line.encode("utf-8")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            try:
                # O_EXCL tells "we created it" without a stat() race.
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                fd = os.open(self.path, flags)
            else:
                os.fchmod(fd, FILE_MODE)        # whatever the umask took away
                data = HEADER.encode("ascii") + data
        except OSError as exc:
            self._error(f"Unable to open message log for writing: {exc.strerror}")
            return False
        try:
            view = memoryview(data)
            while view:                         # a regular file takes it all, bar a full disk
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except OSError as exc:
            self._error(f"Unable to write to message log: {exc.strerror}")
            return False
        finally:
            os.close(fd)
        return True

    def _error(self, text: str) -> None:
        if self.log is not None:
            self.log.error(text)
