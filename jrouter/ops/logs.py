"""The operator's log: jabberd2-compatible log lines on stdout, a file or syslog.

What it owns: choosing and (re)opening the sink, the line format, debug on/off,
and never letting a logging problem stop the router.  What it must not know:
the protocol, the config file format, or signals -- the caller reads
``<log>`` from router.xml, builds a :class:`RouterLog`, and calls ``reopen()``
or ``set_debug()`` when the signal layer asks it to.

Compatibility (protocol §1.6, jabberd2 ``util/log.c``):

* ``stdout`` and ``file`` lines are ``ctime() [level] message``::

      Wed Nov 25 04:56:26 2026 [notice] starting up

  at most 1023 bytes before the newline (jabberd2's ``MAX_LOG_LINE`` buffer
  holds 1024 bytes including the terminating NUL), written and flushed one
  line at a time.  The file is opened in append mode, so ``copytruncate``
  rotation works as well as rename + SIGHUP.
* ``file`` that cannot be opened: two lines on stderr, then stdout.
* ``syslog``: ``openlog(ident, LOG_PID, facility)``; the facility is
  ``local0``..``local7`` or ``log_user`` (case-insensitive, no trimming),
  anything else ``local7``.  We use the stdlib :mod:`syslog` module, i.e. the
  same libc calls as jabberd2: the records look the same to rsyslog/journald,
  and when ``/dev/log`` is absent libc drops them silently instead of failing.
* Any other ``type`` means stdout.
* ``reopen()`` is the log half of SIGHUP (protocol §1.4): ``reopening log ...`` to
  the old sink, close, open the same sink again, ``log started`` to the new one.

Deliberate differences: debug lines exist (jabberd2's Debian build has none) and
use the same format with ``[debug]``; CR, LF and NUL in a message are written as
``\\r``, ``\\n``, ``\\0`` so a peer cannot forge log lines; truncation never splits
a UTF-8 character.

Never log secrets (STYLE rule 8).  Do not pass passwords, ``local.secret``,
key passphrases, SASL payloads or handshake digests to a log method.
"""

from __future__ import annotations

import sys
import syslog
import time
from typing import BinaryIO, Callable, List, Optional, TextIO, Tuple

# Index = syslog priority (LOG_EMERG == 0 ... LOG_DEBUG == 7), as in util/log.c.
LEVELS = ('emergency', 'alert', 'critical', 'error', 'warning', 'notice', 'info', 'debug')
EMERGENCY, ALERT, CRITICAL, ERROR, WARNING, NOTICE, INFO, DEBUG = range(8)

MAX_LINE = 1024                 # jabberd2 MAX_LOG_LINE, including the C string's NUL
DEFAULT_IDENT = 'jabberd/router'

FACILITIES = {
    'local0': syslog.LOG_LOCAL0, 'local1': syslog.LOG_LOCAL1,
    'local2': syslog.LOG_LOCAL2, 'local3': syslog.LOG_LOCAL3,
    'local4': syslog.LOG_LOCAL4, 'local5': syslog.LOG_LOCAL5,
    'local6': syslog.LOG_LOCAL6, 'local7': syslog.LOG_LOCAL7,
    'log_user': syslog.LOG_USER,
}

# Characters that would let a message start a new line, or that syslog(3)
# cannot carry.
_ESCAPES = str.maketrans({'\n': '\\n', '\r': '\\r', '\0': '\\0'})


def syslog_facility(name: Optional[str]) -> int:
    """The syslog facility for a ``<facility>`` value; unknown or missing -> local7."""
    if name is None:
        return syslog.LOG_LOCAL7
    return FACILITIES.get(name.lower(), syslog.LOG_LOCAL7)


def format_line(level: int, message: str, now: float) -> bytes:
    """One stdout/file log line as bytes, newline included, at most MAX_LINE bytes."""
    text = '%s [%s] %s' % (time.ctime(now), LEVELS[level], message.translate(_ESCAPES))
    data = text.encode('utf-8', 'replace')
    if len(data) > MAX_LINE - 1:
        # Cut like C's snprintf, but drop a trailing partial UTF-8 sequence.
        data = data[:MAX_LINE - 1].decode('utf-8', 'ignore').encode('utf-8')
    return data + b'\n'


class _Levels:
    """The eight level methods; subclasses implement ``_emit`` and ``debug_enabled``."""

    debug_enabled = False

    def _emit(self, level: int, message: str) -> None:
        raise NotImplementedError

    def emergency(self, message: str) -> None:
        self._emit(EMERGENCY, message)

    def alert(self, message: str) -> None:
        self._emit(ALERT, message)

    def critical(self, message: str) -> None:
        self._emit(CRITICAL, message)

    def error(self, message: str) -> None:
        self._emit(ERROR, message)

    def warning(self, message: str) -> None:
        self._emit(WARNING, message)

    def notice(self, message: str) -> None:
        self._emit(NOTICE, message)

    def info(self, message: str) -> None:
        self._emit(INFO, message)

    def debug(self, message: str) -> None:
        # Cheap when off; callers that build costly messages test debug_enabled.
        if self.debug_enabled:
            self._emit(DEBUG, message)

    def set_debug(self, enabled: bool) -> None:
        """Debug lines on or off (``-D`` at start, SIGUSR2 on, SIGUSR1 off)."""
        self.debug_enabled = bool(enabled)


class _Sink:
    """Where stdout/file lines go: a binary append-mode file, or the stdout stream."""

    def __init__(self, path: Optional[str], stream: Optional[TextIO]) -> None:
        self.path = path
        self._stream = stream          # None: whatever sys.stdout is when writing
        self._file: Optional[BinaryIO] = None
        if path is not None:
            self._file = open(path, 'ab', buffering=0)   # O_APPEND, one write(2) per line

    def write(self, line: bytes) -> None:
        if self._file is not None:
            self._file.write(line)
            return
        out = self._stream if self._stream is not None else sys.stdout
        if out is None:                # started with fd 1 closed
            return
        buffer = getattr(out, 'buffer', None)
        if buffer is not None:         # a real text stdout: keep our exact bytes
            out.flush()
            buffer.write(line)
            buffer.flush()
        else:
            out.write(line.decode('utf-8'))
            out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _open_file_sink(path: Optional[str], stream: Optional[TextIO]) -> _Sink:
    """A file sink, or stdout after jabberd2's two-line complaint on stderr."""
    try:
        if path is None:
            raise OSError('no <log><file> configured')
        return _Sink(path, stream)
    except OSError as e:
        reason = e.strerror or str(e)
        sys.stderr.write("ERROR: couldn't open logfile: %s\n"
                         "       logging will go to stdout instead\n" % reason)
        sys.stderr.flush()
        return _Sink(None, stream)


class RouterLog(_Levels):
    """The router's log, configured from ``<log>`` in router.xml.

    ``type``: ``'stdout'``, ``'file'`` or ``'syslog'`` (anything else is stdout).
    ``ident``, ``facility``: syslog only.  ``file``: the log file for ``'file'``.
    ``debug``: start with debug lines on.  ``clock``: returns the epoch time for
    the line stamp.  ``stream``: the text stream that stands for stdout (default
    ``sys.stdout`` at the time of writing).  ``debug_file``: optional
    ``<log><debug>`` file that receives the debug lines instead of the main
    sink (same format; falls back to the main sink if it cannot be opened).

    A failing write (disk full, stdout closed) is ignored: the router keeps
    routing.  After ``close()`` further lines are dropped.
    """

    def __init__(self, type: str = 'stdout', ident: Optional[str] = DEFAULT_IDENT,
                 facility: Optional[str] = None, file: Optional[str] = None,
                 debug: bool = False, clock: Callable[[], float] = time.time,
                 stream: Optional[TextIO] = None, debug_file: Optional[str] = None) -> None:
        self.type = type if type in ('file', 'syslog') else 'stdout'
        self.ident = ident if ident is not None else DEFAULT_IDENT
        self.facility = syslog_facility(facility)
        self.file = file
        self.debug_file = debug_file
        self.debug_enabled = bool(debug)
        self._clock = clock
        self._stream = stream
        self._sink: Optional[_Sink] = None
        self._debug_sink: Optional[_Sink] = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        if self.type == 'syslog':
            syslog.openlog(self.ident, syslog.LOG_PID, self.facility)
        elif self.type == 'file':
            self._sink = _open_file_sink(self.file, self._stream)
        else:
            self._sink = _Sink(None, self._stream)
        if self.debug_file is not None:
            try:
                self._debug_sink = _Sink(self.debug_file, self._stream)
            except OSError as e:
                self.warning("couldn't open debug log file %s: %s, debug output goes to"
                             " the main log" % (self.debug_file, e.strerror or e))

    def _close_sinks(self) -> None:
        for sink in (self._sink, self._debug_sink):
            if sink is not None:
                try:
                    sink.close()
                except OSError:
                    pass
        self._sink = self._debug_sink = None
        if self.type == 'syslog':
            syslog.closelog()

    def _emit(self, level: int, message: str) -> None:
        if self._closed:
            return
        try:
            if level == DEBUG and self._debug_sink is not None:
                self._debug_sink.write(format_line(level, message, self._clock()))
            elif self._sink is not None:
                self._sink.write(format_line(level, message, self._clock()))
            else:
                syslog.syslog(level, message.translate(_ESCAPES))
        except (OSError, ValueError):
            pass    # a log problem must never take the router down

    def reopen(self) -> None:
        """SIGHUP: ``reopening log ...``, close, open the same sink, ``log started``.

        A file that failed to open at start (stdout fallback) is tried again,
        as jabberd2 does; if it still fails the stderr complaint repeats.
        """
        if self._closed:
            return
        self.notice('reopening log ...')
        self._close_sinks()
        self._open()
        self.notice('log started')

    def close(self) -> None:
        """Close the sink; later lines are dropped.  Safe to call twice."""
        if not self._closed:
            self._close_sinks()
            self._closed = True


Record = Tuple[str, str]


class MemoryLog(_Levels):
    """A RouterLog stand-in for unit tests: keeps ``(level, message)`` tuples.

    Debug lines are recorded by default (``debug=True``) so tests can assert
    on them; ``reopen()`` records the same two lines as the real log.
    """

    def __init__(self, debug: bool = True) -> None:
        self.records: List[Record] = []
        self.debug_enabled = bool(debug)
        self.closed = False

    def _emit(self, level: int, message: str) -> None:
        self.records.append((LEVELS[level], message))

    def reopen(self) -> None:
        self.notice('reopening log ...')
        self.notice('log started')

    def close(self) -> None:
        self.closed = True

    def messages(self, level: Optional[str] = None) -> List[str]:
        """The recorded messages, optionally only those of one level name."""
        return [m for (lv, m) in self.records if level is None or lv == level]

    def clear(self) -> None:
        self.records.clear()


__all__ = ['LEVELS', 'MAX_LINE', 'DEFAULT_IDENT', 'FACILITIES', 'RouterLog', 'MemoryLog',
           'syslog_facility', 'format_line']
