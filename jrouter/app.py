"""The router process: startup order, pidfile, signals, reload and shutdown.

Startup follows jabberd2's main() (spec 1.3): config, log, pidfile, users,
filter, TLS, listen. Signal handlers only schedule work (gunicorn's rule):
the work itself runs in a greenlet of its own.
"""

import os
import secrets
import signal
import sys

import gevent
from gevent.event import Event

from .config import ConfigError, load_config, load_users
from .core import Router
from .filter import FilterError, load_filter
from .logs import RouterLog
from .server import ListenError, RouterServer

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def make_id():
    """A stream id or nonce as jabberd2 makes them: 40 of [0-9a-z]."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(40))


def run(config_path, id_override=None, debug=False):
    """Run the router until SIGTERM/SIGINT; return the exit code."""
    try:
        config = load_config(config_path, id_override)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("router: couldn't load config, aborting", file=sys.stderr)
        return 2
    log = RouterLog(type=config.log.type, ident=config.log.ident,
                    facility=config.log.facility, file=config.log.file, debug=debug)
    try:
        return RouterProcess(config, log).run()
    finally:
        log.close()


class RouterProcess:
    """One running router: owns the log, the server and the signal handlers."""

    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.stopping = Event()
        self.router = None
        self.server = None

    def run(self):
        log = self.log
        log.notice("starting up")
        self._write_pidfile()
        users = self._load_users() or {}
        try:
            filter_rules = self._load_filter()
        except FilterError:
            return 1
        tls_context = self._tls_context()
        self.router = Router(self.config, users, log, make_id,
                             filter_rules=filter_rules, dump=_append_dump)
        self.server = RouterServer(self.config, self.router, log,
                                   access=self.config.access, tls_context=tls_context)
        try:
            self.server.start()
        except ListenError as exc:
            log.error(str(exc))
            return 1
        self._install_signals()
        self.stopping.wait()
        self.server.stop()
        return 0

    # -- files ---------------------------------------------------------------

    def _write_pidfile(self):
        path = self.config.pidfile
        if not path:
            return
        pid = os.getpid()
        try:
            with open(path, "w") as handle:
                handle.write(str(pid))      # jabberd2 writes no newline
        except OSError as exc:
            self.log.error(f"couldn't open {path} for writing: {exc.strerror}")
            return
        self.log.info(f"process id is {pid}, written to {path}")

    def _load_users(self):
        result = load_users(self.config.users_file)
        for level, message in result.messages:
            getattr(self.log, level)(message)
        return result.users

    def _load_filter(self):
        try:
            result = load_filter(self.config.filter_file)
        except FilterError as exc:
            getattr(self.log, getattr(exc, "level", "error"))(str(exc))
            raise
        for level, message in result.messages:
            getattr(self.log, level)(message)
        return result.rules if len(result.rules) else None

    def _tls_context(self):
        if not self.config.pemfile:
            return None
        from .tls import make_server_context

        try:
            return make_server_context(self.config.pemfile, self.config.private_key_password,
                                       self.config.ciphers)
        except (OSError, ValueError) as exc:
            self.log.error(f"failed to load SSL pemfile, SSL disabled ({exc})")
            return None

    # -- signals ---------------------------------------------------------------

    def _install_signals(self):
        gevent.signal_handler(signal.SIGTERM, self.stopping.set)
        gevent.signal_handler(signal.SIGINT, self.stopping.set)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        gevent.signal_handler(signal.SIGUSR1, lambda: self._set_debug(False))
        gevent.signal_handler(signal.SIGUSR2, lambda: self._set_debug(True))
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _set_debug(self, enabled):
        self.log.set_debug(enabled)
        self.log.notice(f"debug output {'on' if enabled else 'off'}")

    def reload(self):
        """SIGHUP, as jabberd2 (spec 1.6): reopen the log, reload the filter
        and the users; a file that fails to load keeps the old settings."""
        log = self.log
        log.reopen()        # writes "reopening log ..." and "log started"
        log.notice("reloading filter ...")
        try:
            self.router.filter_rules = self._load_filter()
        except FilterError:
            log.error("filter file not reloaded, keeping the old rules")
        log.notice("reloading users ...")
        users = self._load_users()
        if users is not None:
            self.router.users = users


def _append_dump(path, data):
    """A filter rule's dump: append the matched packet to a file."""
    with open(path, "ab") as handle:
        handle.write(data)
