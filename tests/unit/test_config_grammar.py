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
