"""jrouter.ops.logs: jabberd2 log lines (protocol §1.6), sinks, SIGHUP reopen, debug toggle."""

import calendar
import io
import os
import syslog as real_syslog
import time
import types

import pytest

from jrouter.ops import logs
from jrouter.ops.logs import MAX_LINE, MemoryLog, RouterLog, syslog_facility

# Wed Nov 25 04:56:26 2026 UTC, the timestamp of the example log in protocol §1.6.
T0 = calendar.timegm((2026, 11, 25, 4, 56, 26, 0, 0, 0))
STAMP = 'Wed Nov 25 04:56:26 2026'


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Run every test with local time = UTC so ctime() stamps are predictable."""
    monkeypatch.setenv('TZ', 'UTC')
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def stdout_log(**kw):
    out = io.StringIO()
    kw.setdefault('clock', lambda: T0)
    return RouterLog(stream=out, **kw), out


class FakeSyslog(types.SimpleNamespace):
    """The syslog module's constants with recording openlog/syslog/closelog."""

    def __init__(self):
        consts = {k: v for k, v in vars(real_syslog).items() if k.startswith('LOG_')}
        super().__init__(calls=[], **consts)

    def openlog(self, *args):
        self.calls.append(('openlog',) + args)

    def syslog(self, *args):
        self.calls.append(('syslog',) + args)

    def closelog(self):
        self.calls.append(('closelog',))


# -- line format --------------------------------------------------------------

def test_line_format_matches_jabberd2_example():
    """A notice is written as `ctime [notice] message` plus a newline."""
    log, out = stdout_log()
    log.notice('starting up')
    assert out.getvalue() == STAMP + ' [notice] starting up\n'


def test_single_digit_day_is_space_padded_like_ctime():
    """Day numbers below 10 are padded with a space, as C's ctime() does."""
    log, out = stdout_log(clock=lambda: calendar.timegm((2026, 11, 5, 4, 56, 26, 0, 0, 0)))
    log.info('x')
    assert out.getvalue() == 'Thu Nov  5 04:56:26 2026 [info] x\n'


def test_stamp_uses_local_time(monkeypatch):
    """The stamp is local time (TZ), like ctime()."""
    monkeypatch.setenv('TZ', 'Europe/Berlin')
    time.tzset()
    log, out = stdout_log()
    log.notice('x')
    assert out.getvalue().startswith('Wed Nov 25 05:56:26 2026 [notice]')


@pytest.mark.parametrize('name', logs.LEVELS)
def test_each_level_method_writes_its_name(name):
    """Each of the eight level methods writes its jabberd2 level name in brackets."""
    log, out = stdout_log(debug=True)
    getattr(log, name)('hello')
    assert out.getvalue() == '%s [%s] hello\n' % (STAMP, name)


def test_long_lines_are_cut_to_1023_bytes_plus_newline():
    """A line longer than jabberd2's 1024-byte buffer keeps its first 1023 bytes."""
    log, out = stdout_log()
    log.notice('x' * 5000)
    line = out.getvalue()
    assert len(line.encode()) == MAX_LINE and line.endswith('x\n')
    assert line.startswith(STAMP + ' [notice] xxx')


def test_line_of_exactly_1023_bytes_is_kept_whole():
    """A line that just fits is not cut."""
    prefix = len(STAMP + ' [notice] ')
    log, out = stdout_log()
    log.notice('y' * (MAX_LINE - 1 - prefix))
    assert len(out.getvalue()) == MAX_LINE and out.getvalue().endswith('y\n')


def test_truncation_does_not_split_a_utf8_character():
    """Cutting at 1023 bytes drops a partial multi-byte character rather than writing half of it."""
    log, out = stdout_log()
    log.notice('é' * 1000)
    line = out.getvalue()
    assert line.endswith('é\n')
    assert len(line.encode()) <= MAX_LINE


def test_newlines_in_a_message_cannot_forge_a_line():
    """CR, LF and NUL in a message are written escaped, keeping one record per line."""
    log, out = stdout_log()
    log.error('Stream error (bye\nWed Nov 25 04:56:26 2026 [notice] fake\r\0)')
    assert out.getvalue().count('\n') == 1
    assert '(bye\\nWed' in out.getvalue() and 'fake\\r\\0)' in out.getvalue()


def test_unknown_type_means_stdout():
    """A `<log type>` other than file or syslog logs to stdout, as jabberd2."""
    log, out = stdout_log(type='bogus')
    log.notice('x')
    assert log.type == 'stdout' and out.getvalue().endswith('[notice] x\n')


def test_default_stream_is_sys_stdout_at_write_time(capsys):
    """Without an injected stream, lines go to whatever sys.stdout is when writing."""
    log = RouterLog(clock=lambda: T0)
    log.notice('to real stdout é')
    assert capsys.readouterr().out == STAMP + ' [notice] to real stdout é\n'


# -- debug ---------------------------------------------------------------------

def test_debug_is_off_by_default_and_costs_no_clock_call():
    """Debug lines are dropped unless enabled, without even reading the clock."""
    calls = []
    log, out = stdout_log(clock=lambda: calls.append(1) or T0)
    log.debug('hidden')
    assert out.getvalue() == '' and calls == [] and not log.debug_enabled


def test_set_debug_toggles_debug_lines():
    """set_debug(True) (SIGUSR2) shows debug lines, set_debug(False) (SIGUSR1) hides them."""
    log, out = stdout_log()
    log.set_debug(True)
    log.debug('one')
    log.set_debug(False)
    log.debug('two')
    assert out.getvalue() == STAMP + ' [debug] one\n'


def test_debug_flag_at_start_enables_debug_lines():
    """debug=True (`-D`) starts with debug lines on."""
    log, out = stdout_log(debug=True)
    log.debug('on')
    assert log.debug_enabled and out.getvalue().endswith('[debug] on\n')


def test_debug_file_gets_only_debug_lines(tmp_path):
    """With `<log><debug>FILE</debug>`, debug lines go to that file and the rest to the main sink."""
    dbg = tmp_path / 'debug.log'
    log, out = stdout_log(debug=True, debug_file=str(dbg))
    log.debug('d')
    log.notice('n')
    assert dbg.read_text() == STAMP + ' [debug] d\n'
    assert out.getvalue() == STAMP + ' [notice] n\n'


def test_unopenable_debug_file_falls_back_to_main_sink(tmp_path):
    """A debug file that cannot be opened is reported once and debug lines use the main sink."""
    log, out = stdout_log(debug=True, debug_file=str(tmp_path / 'no' / 'debug.log'))
    log.debug('d')
    lines = out.getvalue().splitlines()
    assert "[warning] couldn't open debug log file" in lines[0]
    assert lines[1] == STAMP + ' [debug] d'


# -- file sink -------------------------------------------------------------------

def test_file_sink_appends_and_flushes_each_line(tmp_path):
    """The log file is appended to, and each line is on disk before the next call."""
    path = tmp_path / 'router.log'
    path.write_text('old line\n')
    log = RouterLog(type='file', file=str(path), clock=lambda: T0)
    log.notice('starting up')
    assert path.read_text() == 'old line\n' + STAMP + ' [notice] starting up\n'
    log.close()


def test_reopen_after_rename_writes_the_jabberd2_sighup_lines(tmp_path):
    """logrotate renames the file, SIGHUP reopens: `reopening log ...` ends the old file, `log started` opens the new."""
    path = tmp_path / 'router.log'
    log = RouterLog(type='file', file=str(path), clock=lambda: T0)
    log.notice('before')
    os.rename(path, tmp_path / 'router.log.1')
    log.notice('still old')
    log.reopen()
    log.notice('after')
    log.close()
    assert (tmp_path / 'router.log.1').read_text().splitlines() == [
        STAMP + ' [notice] before', STAMP + ' [notice] still old',
        STAMP + ' [notice] reopening log ...']
    assert path.read_text().splitlines() == [
        STAMP + ' [notice] log started', STAMP + ' [notice] after']


def test_copytruncate_leaves_no_hole(tmp_path):
    """After an external truncate (logrotate copytruncate) the next line starts at offset 0."""
    path = tmp_path / 'router.log'
    log = RouterLog(type='file', file=str(path), clock=lambda: T0)
    log.notice('a' * 100)
    os.truncate(path, 0)
    log.notice('b')
    assert path.read_bytes() == (STAMP + ' [notice] b\n').encode()
    log.close()


def test_unopenable_file_falls_back_to_stdout_with_jabberd2_message(tmp_path, capsys):
    """A log file that cannot be opened prints jabberd2's two stderr lines and logs to stdout."""
    log = RouterLog(type='file', file=str(tmp_path / 'missing' / 'router.log'), clock=lambda: T0)
    log.notice('starting up')
    captured = capsys.readouterr()
    assert captured.err == ("ERROR: couldn't open logfile: No such file or directory\n"
                            "       logging will go to stdout instead\n")
    assert captured.out == STAMP + ' [notice] starting up\n'


def test_file_type_without_path_falls_back_to_stdout(capsys):
    """`<log type='file'>` without `<file>` complains on stderr and logs to stdout."""
    log = RouterLog(type='file', clock=lambda: T0)
    log.notice('x')
    captured = capsys.readouterr()
    assert captured.err.startswith("ERROR: couldn't open logfile: ")
    assert 'logging will go to stdout instead' in captured.err
    assert captured.out.endswith('[notice] x\n')


def test_reopen_retries_the_file_after_a_fallback(tmp_path, capsys):
    """SIGHUP tries the configured file again, so creating its directory and sending HUP fixes logging."""
    path = tmp_path / 'later' / 'router.log'
    log = RouterLog(type='file', file=str(path), clock=lambda: T0)
    path.parent.mkdir()
    log.reopen()
    log.close()
    assert capsys.readouterr().out.endswith('[notice] reopening log ...\n')
    assert path.read_text() == STAMP + ' [notice] log started\n'


def test_reopen_on_stdout_writes_both_lines_to_stdout():
    """On stdout the SIGHUP sequence simply writes both lines."""
    log, out = stdout_log()
    log.reopen()
    assert out.getvalue().splitlines() == [STAMP + ' [notice] reopening log ...',
                                           STAMP + ' [notice] log started']


# -- robustness ---------------------------------------------------------------------

def test_write_errors_are_swallowed():
    """A broken stdout (EPIPE) or full disk never raises out of a log call."""
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, 'Broken pipe')
    log = RouterLog(stream=Broken(), clock=lambda: T0)
    log.error('lost')


def test_close_is_idempotent_and_later_lines_are_dropped(tmp_path):
    """close() can be called twice; lines after it are dropped, not raised."""
    path = tmp_path / 'router.log'
    log = RouterLog(type='file', file=str(path), clock=lambda: T0)
    log.close()
    log.close()
    log.notice('late')
    log.reopen()
    assert path.read_text() == ''


# -- syslog ---------------------------------------------------------------------------

@pytest.mark.parametrize('name, facility', [
    ('local0', real_syslog.LOG_LOCAL0), ('local3', real_syslog.LOG_LOCAL3),
    ('local7', real_syslog.LOG_LOCAL7), ('LOCAL5', real_syslog.LOG_LOCAL5),
    ('log_user', real_syslog.LOG_USER), ('Log_User', real_syslog.LOG_USER),
    (None, real_syslog.LOG_LOCAL7), ('local8', real_syslog.LOG_LOCAL7),
    ('user', real_syslog.LOG_LOCAL7), (' local3', real_syslog.LOG_LOCAL7),
])
def test_syslog_facility_mapping(name, facility):
    """Facility names are local0..local7 and log_user, case-insensitive; anything else is local7."""
    assert syslog_facility(name) == facility


def test_syslog_sink_opens_with_ident_pid_and_facility(monkeypatch):
    """type='syslog' calls openlog(ident, LOG_PID, facility) and logs each line at its priority."""
    fake = FakeSyslog()
    monkeypatch.setattr(logs, 'syslog', fake)
    log = RouterLog(type='syslog', facility='local3')
    log.notice('starting up')
    log.error('bad\nthing')
    log.debug('hidden')
    log.close()
    assert fake.calls == [
        ('openlog', 'jabberd/router', real_syslog.LOG_PID, real_syslog.LOG_LOCAL3),
        ('syslog', real_syslog.LOG_NOTICE, 'starting up'),
        ('syslog', real_syslog.LOG_ERR, 'bad\\nthing'),
        ('closelog',)]


def test_syslog_reopen_closes_and_reopens_with_same_settings(monkeypatch):
    """SIGHUP on syslog: `reopening log ...`, closelog, openlog again, `log started`."""
    fake = FakeSyslog()
    monkeypatch.setattr(logs, 'syslog', fake)
    log = RouterLog(type='syslog', ident='jabberd/router2', facility='nonsense')
    log.reopen()
    opened = ('openlog', 'jabberd/router2', real_syslog.LOG_PID, real_syslog.LOG_LOCAL7)
    assert fake.calls == [opened,
                          ('syslog', real_syslog.LOG_NOTICE, 'reopening log ...'),
                          ('closelog',), opened,
                          ('syslog', real_syslog.LOG_NOTICE, 'log started')]


def test_syslog_ident_none_means_default():
    """ident=None (no `<ident>` in the config) uses jabberd/router."""
    log = RouterLog(type='syslog', ident=None)
    assert log.ident == 'jabberd/router'
    log.close()


def test_real_syslog_works_without_a_daemon():
    """With the real syslog module, logging succeeds (or is silently dropped) even when /dev/log is absent."""
    log = RouterLog(type='syslog', facility='local7', debug=True)
    log.notice('jrouter unit test: syslog smoke test')
    log.debug('jrouter unit test: debug')
    log.reopen()
    log.close()


# -- MemoryLog ---------------------------------------------------------------

def test_memory_log_records_levels_and_reopen():
    """MemoryLog keeps (level, message) tuples, debug included by default, and the SIGHUP lines."""
    log = MemoryLog()
    log.notice('starting up')
    log.debug('d')
    log.reopen()
    log.set_debug(False)
    log.debug('dropped')
    assert log.records == [('notice', 'starting up'), ('debug', 'd'),
                           ('notice', 'reopening log ...'), ('notice', 'log started')]
    assert log.messages('debug') == ['d']
    log.clear()
    log.close()
    assert log.records == [] and log.closed
