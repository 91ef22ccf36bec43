"""jrouter: a drop-in replacement for the jabberd2 router daemon."""

__version__ = "0.1.0"
