"""The router process: startup order, pidfile, signals, reload and shutdown.

Startup follows jabberd2's main() (protocol §1.2): config, log, pidfile, users,
filter, TLS, listen. Signal handlers only schedule work (gunicorn's rule):
the work itself runs in a greenlet of its own.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from typing import TYPE_CHECKING, Optional

import gevent
from gevent.event import Event

from jrouter.routing.access import ConnectLimiter
from jrouter.config import ConfigError, load_config, load_users
from jrouter.routing.router import Router
from jrouter.config.filter_xml import FilterError, load_filter
from jrouter.ops.logs import RouterLog
from jrouter.ops.listener import raise_fd_limit
from jrouter.ops.server import ListenError, RouterServer
from jrouter.errors import ConfigurationError

if TYPE_CHECKING:
    import ssl

    from jrouter.config import ClusterSettings, Config
    from jrouter.ops.cluster_node import ClusterNode
    from jrouter.ops.status import StatusServer
    from jrouter.routing.filter import FilterRules

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# What secrets.choice is (the OS's random source); the secrets module itself
# would load hmac and, through it, OpenSSL's libcrypto (~3.5 MiB) for the
# process's life.
_choice = random.SystemRandom().choice


def make_id() -> str:
    """A stream id or nonce as jabberd2 makes them: 40 of [0-9a-z]."""
    return "".join(_choice(_ID_ALPHABET) for _ in range(40))


def run(config_path: str, id_override: Optional[str] = None, debug: bool = False) -> int:
    """Run the router until SIGTERM/SIGINT; return the exit code."""
    try:
        config = load_config(config_path, id_override)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("router: couldn't load config, aborting", file=sys.stderr)
        return 2
    log = RouterLog(type=config.log.type, ident=config.log.ident,
                    facility=config.log.facility, file=config.log.file, debug=debug,
                    debug_file=config.log.debug)
    try:
        return RouterProcess(config, log, id_override).run()
    finally:
        log.close()


class RouterProcess:
    """One running router: owns the log, the server and the signal handlers."""

    def __init__(self, config: Config, log: RouterLog, id_override: Optional[str] = None) -> None:
        self.config = config
        self.log = log
        self.id_override = id_override
        self.stopping = Event()
        # Made by run(), before the signal handlers that reload are installed.
        self.router: Router = None  # type: ignore[assignment]
        self.server: Optional[RouterServer] = None
        self.cluster: Optional[ClusterNode] = None     # with <cluster>: this node's part

    def run(self) -> int:
        log = self.log
        log.notice("starting up")
        self._write_pidfile()
        users = self._load_users() or {}
        try:
            filter_rules = self._load_filter()
        except FilterError:
            return 1
        tls_context = self._tls_context()
        raise_fd_limit(self.config.max_fds, log.warning)
        self.router = Router(self.config, users, log, make_id, random.randrange,
                             filter_rules=filter_rules)
        state = None
        # A cluster's slots are its slot keys in etcd (docs/cluster.md §8), not a node's file.
        if self.config.placement_state_dir and self.config.cluster is None:
            from jrouter.ops.placement_state import PlacementState   # json, tempfile: only then

            state = PlacementState(self.config.placement_state_dir, log.warning)
            self.router.table.restore(state.load())
        limits = self.config.connects_limit
        self.server = RouterServer(
            self.config, self.router, log, access=self.config.access, tls_context=tls_context,
            connect_limiter=ConnectLimiter(limits) if limits.total > 0 else None,
            placement_state=state)
        cluster = None
        try:
            if self.config.cluster is not None:
                cluster = self._join_cluster(self.config.cluster)
            self.server.start()
            status = self._start_status()
        except (ListenError, ConfigurationError) as exc:  # StatusListenError too; a bad cafile
            log.error(str(exc))
            if cluster is not None:
                cluster.stop()
            return 1
        self._install_signals()
        self.stopping.wait()
        if status is not None:
            status.stop()
        self.server.stop()
        if cluster is not None:
            cluster.stop()
        return 0

    def _join_cluster(self, settings: ClusterSettings) -> ClusterNode:
        """One node of several (<cluster>): links and the table in etcd come
        up before components are accepted, so that their binds are known to
        every node (waiting bind-wait at most; the agent keeps trying)."""
        from jrouter.ops.cluster_node import ClusterNode   # etcd, peer links: only then

        assert self.server is not None
        node = ClusterNode(settings, self.router, self.server, self.log,
                           self.config.queue_limit, self.config.stanza_size_limit)
        node.start(join_timeout=max(settings.etcd.bind_wait, settings.etcd.timeout))
        self.cluster = node
        return node

    def _start_status(self) -> Optional[StatusServer]:
        """The operator's read-only HTTP endpoint, when <status> asks for it."""
        settings = self.config.status
        if settings is None or not settings.enabled:
            return None
        from jrouter.ops.status import StatusServer   # and its HTTP, JSON and figures: only then

        status = StatusServer(settings, self.router, time.monotonic, self.log)
        status.start()
        return status

    # -- files ---------------------------------------------------------------

    def _write_pidfile(self) -> None:
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

    def _load_users(self) -> Optional[dict[str, str]]:
        """The user table, or None when the file could not be read (at
        startup jabberd2 then serves with no users; on reload we keep the
        old table)."""
        result = load_users(self.config.users_file)
        for level, message in result.messages:
            getattr(self.log, level)(message)
        loaded = any(message.startswith("loaded user table") for _, message in result.messages)
        if not loaded:
            self.log.error("users not loaded, keeping the previous table")
            return None
        return result.users

    def _load_filter(self) -> Optional[FilterRules]:
        try:
            result = load_filter(self.config.filter_file)
        except FilterError as exc:
            getattr(self.log, getattr(exc, "level", "error"))(str(exc))
            raise
        for level, message in result.messages:
            getattr(self.log, level)(message)
        return result.rules if len(result.rules) else None

    def _tls_context(self) -> Optional[ssl.SSLContext]:
        if not self.config.pemfile:
            return None
        from jrouter.ops.tls import make_server_context

        try:
            return make_server_context(self.config.pemfile, self.config.private_key_password,
                                       self.config.ciphers)
        except (OSError, ValueError) as exc:
            self.log.error(f"failed to load SSL pemfile, SSL disabled ({exc})")
            return None

    # -- signals ---------------------------------------------------------------

    def _install_signals(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self.stopping.set)
        gevent.signal_handler(signal.SIGINT, self.stopping.set)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        gevent.signal_handler(signal.SIGUSR1, lambda: self._set_debug(False))
        gevent.signal_handler(signal.SIGUSR2, lambda: self._set_debug(True))
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _set_debug(self, enabled: bool) -> None:
        self.log.set_debug(enabled)
        self.log.notice(f"debug output {'on' if enabled else 'off'}")

    def reload(self) -> None:
        """SIGHUP: what jabberd2 does (protocol §1.4: reopen the log, reload the
        filter and the users), then what it cannot: router.xml's ACLs,
        aliases, XEP-0114 secret, keepalive and clustering policies. A file
        that fails to load keeps the old settings, and the log says why."""
        log = self.log
        log.reopen()        # writes "reopening log ..." and "log started"
        log.notice("reloading filter ...")
        try:
            self.router.set_filter(self._load_filter())
        except FilterError:
            log.error("filter file not reloaded, keeping the old rules")
        log.notice("reloading users ...")
        users = self._load_users()
        if users is not None:
            self.router.users = users
        self._reload_config()

    def _reload_config(self) -> None:
        self.log.notice(f"reloading {self.config.source} ...")
        try:
            config = load_config(self.config.source, self.id_override)
        except ConfigError as exc:
            for problem in exc.problems:
                self.log.error(problem)
            self.log.error(f"{self.config.source} not reloaded, keeping the old settings")
            return
        self.router.reconfigure(config)
        self.log.notice("reloaded ACLs, aliases, secret, keepalive, message logging and clustering policies "
                        "(listening address, TLS and limits need a restart)")

