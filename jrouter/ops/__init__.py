"""The shell: the only code that touches gevent, sockets, files and the clock.

Owns: the server loop and TLS (``server``, ``tls``), the process with its
pidfile, signals and reloads (``app``), the command line (``cli``,
``status_cli``), logs (``logs``), the message log file, the status endpoint
(``status``) and the operator's view of a running router (``stats``).

Must not know: the protocols. It moves bytes in and out of
``wire.connection.Connection`` and calls the ``routing.router.Router``.
"""
