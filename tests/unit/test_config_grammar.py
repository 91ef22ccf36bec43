"""jrouter.config.grammar: the one grammar of every section's values."""

import pytest

from jrouter.config import grammar


@pytest.mark.parametrize("text, number", [("5", 5), (" +7\n", 7), ("-3", -3)])
def test_integer_allows_sign_and_white_space(text, number):
    """Integers read like jabberd2's, minus the garbage atoi accepts."""
    assert grammar.integer(text) == number


@pytest.mark.parametrize("text", ["", "12abc", "abc", "1.5", "0x10"])
def test_integer_refuses_what_atoi_would_misread(text):
    """'12abc' is not 12 and 'abc' is not 0: both are refused with the text quoted."""
    with pytest.raises(ValueError, match="expected an integer, got"):
        grammar.integer(text)


def test_ranges_say_which_bound_was_missed():
    """non_negative, positive and port name their bound in the message."""
    with pytest.raises(ValueError, match="must not be negative, got -1"):
        grammar.non_negative("-1")
    with pytest.raises(ValueError, match="must be at least 1, got 0"):
        grammar.positive("0")
    with pytest.raises(ValueError, match="port must be between 1 and 65535, got 70000"):
        grammar.port("70000")
    assert grammar.port("5347") == 5347


@pytest.mark.parametrize("text, value", [("yes", True), ("NO", False), ("true", True),
                                         ("off", False), (" 1 ", True), ("0", False)])
def test_boolean_words(text, value):
    """Our yes/no attributes accept one set of words, in any case."""
    assert grammar.boolean(text) is value


def test_boolean_refuses_other_words():
    with pytest.raises(ValueError, match="expected yes or no, got 'maybe'"):
        grammar.boolean("maybe")


def test_jabberd2_flag_is_any_integer_but_zero():
    """jabberd2's <enabled/> switches: '1' (an empty element) and any non-zero integer are on."""
    assert grammar.jabberd2_flag("1") and grammar.jabberd2_flag("7")
    assert not grammar.jabberd2_flag("0")


def test_problems_name_file_line_and_key():
    problems = grammar.Problems("/etc/jabberd2/router.xml")
    problems.add(12, "local.port", "port must be between 1 and 65535, got 0")
    assert problems == ["/etc/jabberd2/router.xml:12: local.port: port must be between 1 and 65535, got 0"]


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:5348", ("10.0.0.1", 5348)),
    ("Router-A.Example.com:1", ("router-a.example.com", 1)),
    ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
])
def test_host_port_reads_ipv4_names_and_bracketed_ipv6(text, expected):
    """host:port: an IPv4 address or a domain name (lower-cased), an IPv6 address in brackets."""
    assert grammar.host_port(text) == expected


@pytest.mark.parametrize("text, message", [
    ("router-a", "expected host:port"),
    (":5348", "expected host:port"),
    ("2001:db8::1:5348", "write an IPv6 address in brackets"),
    ("[10.0.0.1]:5348", "only an IPv6 address goes in brackets"),
    ("[2001:db8::1]", r"expected \[IPv6 address\]:port"),
    ("router_a!:5348", "is not a domain name"),
    ("router-a:0", "port must be between 1 and 65535, got 0"),
])
def test_host_port_refusals(text, message):
    """What is not host:port says why; nothing is resolved."""
    with pytest.raises(ValueError, match=message):
        grammar.host_port(text)


def test_token_is_a_safe_name():
    """Tokens: 1-64 ASCII letters, digits, '-', '_', '.'; nothing else."""
    assert grammar.token("node_a-1.eu") == "node_a-1.eu"
    for bad in ("", "a/b", "a b", "n\u00f6de", "x" * 65):
        with pytest.raises(ValueError, match="is not a name of 1 to 64"):
            grammar.token(bad)
