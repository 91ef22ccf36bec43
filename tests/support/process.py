"""A child process for tests: started with its output in files, stopped for sure.

Owns: spawning a daemon that runs in the foreground, waiting for it to be
ready, and stopping it with SIGTERM, then SIGKILL after a bounded wait.
Must not know: what the daemon is or how its config looks.
"""

import atexit
import os
import signal
import subprocess

from .ports import is_listening, wait_until

_running = set()


@atexit.register
def _stop_leftovers():
    """Kill what a crashed test left running, so no daemon outlives pytest."""
    for proc in list(_running):
        proc.stop(timeout=2.0)


class ProcessDied(RuntimeError):
    """The process exited while we were waiting for it to become ready."""


class ManagedProcess:
    """One foreground daemon with stdout/stderr captured to files in `workdir`.

    `name` labels the files (`NAME.stdout`, `NAME.stderr`) and error messages;
    `log_path` is the daemon's own log file, if it writes one.
    """

    # Log lines containing any of these are left out of describe().
    log_noise = ()

    def __init__(self, name, argv, workdir, *, cwd=None, env=None, log_path=None):
        self.name = name
        self.argv = list(argv)
        self.workdir = str(workdir)
        self.cwd = str(cwd) if cwd is not None else self.workdir
        self.env = env
        self.log_path = str(log_path) if log_path is not None else None
        self.stdout_path = os.path.join(self.workdir, name + ".stdout")
        self.stderr_path = os.path.join(self.workdir, name + ".stderr")
        self.popen = None

    # -- lifecycle ---------------------------------------------------------

    def spawn(self):
        """Start the process (does not wait for readiness)."""
        if self.popen is not None:
            raise RuntimeError("%s already started" % self.name)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True)
        _running.add(self)
        return self

    def stop(self, timeout=5.0):
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL; return the exit code."""
        if self.popen is None:
            return None
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5.0)
        finally:
            _running.discard(self)
        return self.popen.returncode

    def send_signal(self, signum):
        """Send `signum` to the process (only if it still runs)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signum)

    # -- state -------------------------------------------------------------

    @property
    def pid(self):
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self):
        return self.popen.poll() if self.popen is not None else None

    def running(self):
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self):
        """Raise ProcessDied, with the process's output, if it has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise ProcessDied("%s exited with code %s\n%s" % (
                self.name, self.popen.returncode, self.describe(tail=5)))

    def wait_for(self, predicate, timeout, what):
        """Poll `predicate()` until true; fail fast if the process dies."""
        try:
            wait_until(predicate, timeout, "%s: %s" % (self.name, what), alive=self.check_alive)
        except TimeoutError as exc:
            raise TimeoutError("%s\n%s" % (exc, self.describe(tail=5))) from None

    def spawn_until(self, timeout, *, log=None, port=None, ready=None, what="ready"):
        """Spawn, then wait (bounded, each in turn) for `log` in the daemon's
        log, for this process to listen on `port`, and for `ready()`; if any
        fails, stop the process and raise."""
        self.spawn()
        try:
            if log is not None:
                self.wait_for_log(log, timeout)
            if port is not None:
                self.wait_for(lambda: is_listening(port, self.pid), timeout, "listening on port %d" % port)
            if ready is not None:
                self.wait_for(ready, timeout, what)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_log(self, text, timeout=10.0):
        """Wait until the daemon's log file contains `text`; return the log."""
        self.wait_for(lambda: text in self.log_text, timeout, "log line %r" % text)
        return self.log_text

    # -- output ------------------------------------------------------------

    @staticmethod
    def _read(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def log_text(self):
        """The daemon's log file as text ('' if it has none yet)."""
        return self._read(self.log_path) if self.log_path else ""

    @property
    def stdout_text(self):
        return self._read(self.stdout_path)

    @property
    def stderr_text(self):
        return self._read(self.stderr_path)

    def describe(self, tail=40):
        """argv plus the last `tail` lines of log, stdout and stderr, for failure messages."""
        parts = ["command: %s" % " ".join(self.argv)]
        log = [line for line in self.log_text.splitlines()
               if not any(noise in line for noise in self.log_noise)]
        for label, lines in (("log", log), ("stdout", self.stdout_text.splitlines()),
                             ("stderr", self.stderr_text.splitlines())):
            if lines:
                parts.append("--- %s %s (last %d lines) ---\n%s" % (
                    self.name, label, tail, "\n".join(lines[-tail:])))
        return "\n".join(parts)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()



class RestartableDaemon:
    """A daemon a test starts, kills and starts again: one ManagedProcess per
    run in `runs`, oldest first; the newest is `process`. `kill()` sends
    SIGKILL, so the router sees the connection drop without a goodbye, as
    after a crash."""

    def __init__(self):
        self.runs = []

    @property
    def process(self):
        return self.runs[-1] if self.runs else None

    def _launch(self, run, ready_text, timeout):
        """Spawn `run` and wait (bounded) until its log shows `ready_text`."""
        self.runs.append(run)
        run.spawn_until(timeout, log=ready_text)
        return self

    def kill(self, timeout=5.0):
        """SIGKILL the running run and reap it."""
        run = self.process
        if run is not None and run.running():
            run.send_signal(signal.SIGKILL)
        return run.stop(timeout) if run is not None else None

    def stop(self, timeout=5.0):
        for run in self.runs:
            run.stop(timeout)
