"""Peers for tests and the benchmark: the client roles jrouter itself never plays.

``sasl_client.DigestMD5Client`` is the DIGEST-MD5 client of jabberd2's sm and
c2s.  Nothing in the router imports this package.
"""
