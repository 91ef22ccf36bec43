"""Unit tests for jrouter.routing.filter: router-filter.xml loading and rule matching (protocol §2.5).

Behaviours marked "verified" were checked against Debian's jabberd2-router 2.7.0.
"""

import ctypes
import ctypes.util

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from jrouter.config.filter_xml import FilterError, condition_for, load_filter
from jrouter.routing.filter import FilterRules, Rule, Verdict, compile_wildcard, find_path, strip_resource

NS_C = "http://jabberd.jabberstudio.org/ns/component/1.0"


def load(tmp_path, body):
    path = tmp_path / "router-filter.xml"
    path.write_text(body, encoding="utf-8")
    return load_filter(str(path))


def rules_of(tmp_path, *rule_xml):
    return load(tmp_path, "<filter>" + "".join(rule_xml) + "</filter>").rules


def route(xml):
    """A factory for a <route> element as the router would have parsed it inside the stream."""
    doc = etree.fromstring(
        f"<stream:stream xmlns='{NS_C}' xmlns:stream='http://etherx.jabber.org/streams'>{xml}</stream:stream>"
    )
    return lambda: doc[0]


def never():
    raise AssertionError("route tree built although no rule needs it")


# --- loading -------------------------------------------------------------


def test_missing_file_is_a_notice(tmp_path):
    """A missing filter file loads no rules and logs a notice (not fatal)."""
    path = str(tmp_path / "none.xml")
    result = load_filter(path)
    assert len(result.rules) == 0
    assert result.messages == [("notice", f"couldn't open filter file {path}: No such file or directory")]


def test_empty_file_is_fatal(tmp_path):
    """An empty filter file raises FilterError 'empty filter file X' (jabberd2 exits 1)."""
    path = tmp_path / "f.xml"
    path.write_bytes(b"")
    with pytest.raises(FilterError, match=f"^empty filter file {path}$"):
        load_filter(str(path))


@pytest.mark.parametrize("body", ["<filter><rule></filter>", "  ", '<!DOCTYPE f [<!ENTITY e "x">]><filter/>'])
def test_unparsable_file_is_fatal(tmp_path, body):
    """A malformed filter file (or one with a DTD) raises 'couldn't parse filter file'."""
    with pytest.raises(FilterError, match="^couldn't parse filter file$"):
        load(tmp_path, body)


def test_loaded_message_counts_rules(tmp_path):
    """Success logs 'loaded filters (N rules)'; only <rule> children of the root count."""
    result = load(tmp_path, "<f><rule/><x><rule/></x><!-- <rule/> --><rule from='*'/></f>")
    assert len(result.rules) == 2
    assert result.messages == [("notice", "loaded filters (2 rules)")]


def test_shipped_debian_filter_has_no_rules():
    """jabberd2's shipped router-filter.xml (all commented out) loads 0 rules."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "conf" / "router-filter.xml.dist"
    assert load_filter(str(path)).messages == [("notice", "loaded filters (0 rules)")]


def test_rule_attributes(tmp_path):
    """Attributes become rule fields; empty values count as absent and what='*' as no what."""
    [rule] = rules_of(tmp_path, "<rule from='' to='a@b' what='*' redirect='' dump='' error='forbidden' log='on'/>").rules
    assert rule == Rule(sender=None, to="a@b", what=None, redirect=None, error="forbidden", log=True, dump=None, line=1)


@pytest.mark.parametrize(
    "value, condition",
    [
        ("", "bad-request"),
        ("re", "recipient-unavailable"),
        ("red", "redirect"),
        ("forbidden", "forbidden"),
        ("not-a", "not-acceptable"),
        ("forbiddenx", "not-allowed"),
        ("nonsense", "not-allowed"),
        ("Forbidden", "not-allowed"),
    ],
)
def test_error_condition_prefix_lookup(value, condition):
    """error selects the first condition starting with the value, else not-allowed (protocol §2.5)."""
    assert condition_for(value) == condition


@pytest.mark.parametrize(
    "value, logs",
    [("yes", True), ("YES", True), ("y", True), ("on", True), ("On", True), ("o", True), ("", True),
     ("no", False), ("off", False), ("yess", False), ("true", False), (None, False)],
)
def test_log_attribute(tmp_path, value, logs):
    """log is on when its value is a case-insensitive prefix of YES or ON (verified for '')."""
    attr = "" if value is None else f" log='{value}'"
    [rule] = rules_of(tmp_path, f"<rule{attr}/>").rules
    assert rule.log is logs


# --- matching: from/to ---------------------------------------------------


@pytest.mark.parametrize(
    "jid, bare",
    [
        ("u@d/r", "u@d"),
        ("d/r", "d"),
        ("d", "d"),
        ("a/b@c/d", "a/b@c"),  # first / after the @
        ("u@d/r/s", "u@d"),
        ("U@D/R", "U@D"),  # no case folding
        ("", None),
        (None, None),
    ],
)
def test_strip_resource(jid, bare):
    """Resources are cut as filter_packet does; empty means absent."""
    assert strip_resource(jid) == bare


def test_first_matching_rule_wins(tmp_path):
    """Rules are tried in order; the first match decides."""
    rules = rules_of(
        tmp_path,
        "<rule from='*@good.org' to='*'/>",
        "<rule error='not-acceptable' from='*' to='*'/>",
    )
    assert rules.match("a@good.org/r", "b@x", never) == Verdict("allow", rule_index=0)
    assert rules.match("a@evil.org/r", "b@x", never) == Verdict("deny", 406, "not-acceptable", rule_index=1)


def test_no_match_is_none(tmp_path):
    """A route that no rule matches gets None (allow, nothing logged)."""
    assert rules_of(tmp_path, "<rule from='a@b' to='*'/>").match("c@d", "e@f", never) is None


def test_presence_of_from_and_to_must_agree(tmp_path):
    """A rule with from/to matches only stanzas having them, and vice versa."""
    rules = rules_of(tmp_path, "<rule error='conflict'/>", "<rule from='*' error='gone'/>", "<rule to='*' error='forbidden'/>")
    assert rules.match(None, None, never).condition == "conflict"
    assert rules.match("a@b", None, never).condition == "gone"
    assert rules.match(None, "a@b", never).condition == "forbidden"
    assert rules.match("a@b", "c@d", never) is None
    assert rules.match("", "", never).condition == "conflict"  # empty = absent


def test_wildcards_case_sensitive_and_resource_free(tmp_path):
    """Patterns see the bare JID and compare case-sensitively (verified: U3 vs u3)."""
    rules = rules_of(tmp_path, "<rule from='U3@c2s' to='x@sm' error='gone'/>")
    assert rules.match("u3@c2s/r", "x@sm/r", never) is None
    assert rules.match("U3@c2s/r", "x@sm/r", never).error_code == 302


def test_wildcard_star_spans_dots_and_slashes(tmp_path):
    """'*' matches across '.' and '/', since fnmatch runs without flags."""
    rules = rules_of(tmp_path, "<rule from='*' to='*.example.com' error='forbidden'/>")
    assert rules.match("a/b@c", "user@muc.sub.example.com/nick", never).error_code == 403
    assert rules.match("a", "example.com", never) is None


# --- matching: what paths ------------------------------------------------


def test_what_path_only_built_when_needed(tmp_path):
    """The route tree is built lazily, once, and only when a rule with what is reached."""
    calls = []
    tree = route("<route><message from='a@b' to='c@d'><body/></message></route>")

    def factory():
        calls.append(1)
        return tree()

    rules = rules_of(tmp_path, "<rule from='x@y' to='*' what='message'/>", "<rule from='*' to='*' what='iq'/>",
                     "<rule from='*' to='*' what='message/body' error='gone'/>")
    assert rules.match("a@b", "c@d", factory).error_code == 302
    assert calls == [1]


def test_remembered_pair_still_matches_what_per_packet(tmp_path):
    """The memo keeps what an address pair's from/to decide; a what path is
    still matched against each packet, and the rules after it still apply."""
    rules = rules_of(tmp_path, "<rule from='*' to='c@d' what='iq' error='forbidden'/>",
                     "<rule from='*' to='c@d' redirect='e@f'/>")
    iq = route("<route><iq from='a@b/r' to='c@d'/></route>")
    message = route("<route><message from='a@b/r' to='c@d'/></route>")
    for _ in range(2):
        assert rules.match("a@b/r", "c@d", iq).action == "deny"
        assert rules.match("a@b/r", "c@d", message).redirect == "e@f"
        assert rules.match("a@b/r", "x@y", never) is None


def test_memo_is_bounded(tmp_path, monkeypatch):
    """A stream of new address pairs never grows the memo past MEMO_SIZE,
    and a pair forgotten on a reset is decided again, the same way."""
    from jrouter.routing import filter as filter_module

    monkeypatch.setattr(filter_module, "MEMO_SIZE", 8)
    rules = rules_of(tmp_path, "<rule from='*@spam' error='forbidden'/>")
    for i in range(50):
        sender = f"u{i}@spam" if i % 2 else f"u{i}@ok"
        verdict = rules.match(sender, None, never)
        assert (verdict is not None) == bool(i % 2)
        assert len(rules._memo) <= 8


@pytest.mark.parametrize(
    "stanza, what, found",
    [
        ("<message/>", "message", True),
        ("<message/>", "iq", False),
        ("<message><x/><body>hi</body></message>", "message/body", True),  # verified
        ("<message type='chat'/>", "?type=chat", True),  # verified: any child name
        ("<message type='chat'/>", "message?type=normal", False),
        ("<message type='x'/>", "message?type=", True),  # verified: empty value tests presence
        ("<message/>", "message!type", True),
        ("<message type='a'/>", "message!type=b", True),
        ("<message type='a'/>", "message!type=a", False),
        ("<iq><query xmlns='jabber:iq:roster'/><query xmlns='jabber:iq:register'/></iq>",
         "iq/query?xmlns=jabber:iq:register", True),  # verified: searches all siblings
        ("<message><x xmlns='urn:a'/><x xmlns='urn:b'/></message>", "message/x?xmlns=urn:b", True),  # verified
        ("<message/>", "message?xmlns", False),  # verified: xmlns without value never matches
        ("<message/>", "message!xmlns", True),  # verified
        ("<message/>", f"message?xmlns={NS_C}", True),  # verified: inherited route namespace
        ("<message xmlns='jabber:client'/>", "message?xmlns=jabber:client", True),  # verified
        ("<message/>", "message?xmlns=http://etherx.jabber.org/streams", False),  # stream-level only
        ("<message/>", "message?xmlns=", False),  # no element has the empty namespace
        ("<message xmlns='jabber:client'><body/></message>", "message/body?xmlns=jabber:client", True),
        ("<x:message xmlns:x='urn:x'/>", "message", True),  # names compared without namespace
        ("<message p:type='chat' xmlns:p='urn:p'/>", "message?type=chat", True),
        ("<message type='get/x'/>", "message?type=get/x", True),  # '?' before '/': no descent
    ],
)
def test_what_paths(stanza, what, found):
    """what paths select as nad_find_elem_path does."""
    tree = route(f"<route to='sm' from='c2s'>{stanza}</route>")()
    assert (find_path(tree, what) is not None) is found


def test_what_descends_into_first_named_child_only():
    """a/b only looks inside the first <a> (C loop quirk; verified with two <message>s)."""
    tree = route("<route><message/><message><body/></message></route>")()
    assert find_path(tree, "message/body") is None


def test_what_odd_paths_follow_c_string_cutting():
    """An '=' before the '?' cuts the element name, as the C code's NUL writes do."""
    tree = route("<route><a b='c'/></route>")()
    # "a=x?b": name "a", attribute "b", value "x?b" cut at the '?' -> "x"
    assert find_path(tree, "a=x?b") is None
    assert find_path(tree, "a=c?b") is not None


# --- verdicts ------------------------------------------------------------


def test_deny_verdict_and_log_line(tmp_path):
    """A deny carries the legacy code and jabberd2's log line (verified format)."""
    rules = rules_of(tmp_path, "<rule error='forbidden' from='*@evil.gov' to='admin@example.org' what='iq/vCard' log='on'/>")
    verdict = rules.match("x@evil.gov/r", "admin@example.org", route("<route><iq><vCard/></iq></route>"))
    assert verdict == Verdict(
        "deny", 403, "forbidden", None,
        "filter: deny packet from=x@evil.gov to=admin@example.org - rule (from=*@evil.gov to=admin@example.org what=iq/vCard)",
    )


def test_allow_verdict_log_prints_null(tmp_path):
    """An allow rule logs 'allow', and unset values print as (null) (verified)."""
    rules = rules_of(tmp_path, "<rule from='u6@c2s' log='yes'/>")
    assert rules.match("u6@c2s/r", None, never).log_line == (
        "filter: allow packet from=u6@c2s to=(null) - rule (from=u6@c2s to=(null) what=(null))"
    )


def test_redirect_verdict(tmp_path):
    """redirect alone rewrites the route's to; the log line names the new to."""
    rules = rules_of(tmp_path, "<rule from='*' to='god@example.org' redirect='admin@example.org' log='yes'/>")
    verdict = rules.match("a@b/c", "god@example.org/x", never)
    assert verdict.action == "redirect" and verdict.redirect == "admin@example.org"
    assert verdict.error_code is None
    assert verdict.log_line.endswith("what=(null)), new to=admin@example.org")


def test_redirect_with_error_bounces_to_redirect_target(tmp_path):
    """error + redirect: deny with the error, after rewriting the route's to (protocol §2.5)."""
    rules = rules_of(tmp_path, "<rule from='*' to='*' redirect='admin@redir.example.com' error='forbidden' log='yes'/>")
    verdict = rules.match("a@b", "c@d", never)
    assert (verdict.action, verdict.error_code, verdict.redirect) == ("deny", 403, "admin@redir.example.com")
    assert verdict.log_line.startswith("filter: redirect packet")  # jabberd2 logs it as a redirect


def test_error_selecting_redirect_with_target_redirects(tmp_path):
    """error='red' selects the redirect condition: with a target it is a plain redirect (verified)."""
    verdict = rules_of(tmp_path, "<rule from='*' to='*' error='red' redirect='other'/>").match("a@b", "c@d", never)
    assert (verdict.action, verdict.redirect, verdict.error_code) == ("redirect", "other", None)


def test_error_selecting_redirect_without_target_delivers(tmp_path):
    """error='redirect' without redirect delivers the route unchanged but logs 'deny' (verified)."""
    verdict = rules_of(tmp_path, "<rule from='*' to='*' error='redirect' log='yes'/>").match("a@b", "c@d", never)
    assert verdict.action == "allow"
    assert verdict.log_line.startswith("filter: deny packet")


def test_dump_path_in_verdict(tmp_path):
    """dump is handed back to the caller, which does the file I/O."""
    verdict = rules_of(tmp_path, "<rule from='user@evil.gov' to='*' dump='/tmp/evil.xml'/>").match("user@evil.gov/x", "a@b", never)
    assert (verdict.action, verdict.dump, verdict.log_line) == ("allow", "/tmp/evil.xml", None)


@pytest.mark.parametrize(
    "condition, code",
    [("bad-request", 400), ("conflict", 409), ("gone", 302), ("not-allowed", 405),
     ("remote-server-timeout", 502), ("service-unavailable", 503), ("unknown-sender", 400)],
)
def test_error_codes(tmp_path, condition, code):
    """Deny verdicts carry the legacy code listed in protocol §4.5."""
    verdict = rules_of(tmp_path, f"<rule error='{condition}'/>").match(None, None, never)
    assert (verdict.condition, verdict.error_code) == (condition, code)


def test_empty_rules_falsy():
    """No rules: len 0, so the router skips filtering entirely."""
    assert not FilterRules()


# --- fnmatch fidelity ----------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.fnmatch.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int)


def libc_fnmatch(pattern: str, text: str) -> bool:
    return _libc.fnmatch(pattern.encode(), text.encode(), 0) == 0


@pytest.mark.parametrize(
    "pattern, text",
    [
        ("*@evil.gov", "user@evil.gov"), ("a?c", "abc"), ("a?c", "a/c"), ("[abc]x", "bx"),
        ("[!abc]x", "bx"), ("[^abc]x", "dx"), ("[]]", "]"), ("[!]]", "a"), ("[a-c]", "b"),
        ("[c-a]", "b"), ("\\*", "*"), ("\\*", "a"), ("a\\", "a\\"), ("[", "["), ("[ab", "[ab"),
        ("[[:alpha:]]1", "x1"), ("[[:digit:]]", "x"), ("[[:bogus:]]", "b"), ("*.*", ".x"),
        ("[\\]]", "]"), ("[a\\-z]", "-"), ("[a-]", "-"), ("**", ""), ("*", ""),
        ("[!c-a]", "b"), ("[^c-a]x", "bx"), ("[[.a.]-c]", "b"), ("[[=a=]-c]", "b"), ("[[:Alpha:]]", "A"),
        ("[a-", "[a-"), ("[[", "[["), ("[!a", "[!a"), ("[[.ab.]]", "a"), ("a[aa-[:alpha:]", "aa"), ("[[=a.]", "="), ("[[=ab=]]", "a]"),
    ],
)
def test_wildcard_examples_match_libc(pattern, text):
    """Wildcards agree with glibc fnmatch(pattern, text, 0) on tricky cases."""
    assert bool(compile_wildcard(pattern).match(text.encode())) == libc_fnmatch(pattern, text)


# Tokens from which glibc's two bracket scanners cannot disagree: no token
# starts with ':', '=' or '.', so "[:", "[=" and "[." only come whole.
_pattern_tokens = st.sampled_from(
    list("abc*?[]!^-\\/@") + ["x.", "*.", "[[:alpha:]]", "[[:digit:]x]", "[[.a.]]", "[![=b=]]", "[a-[.c.]]"]
)
_text_chars = st.sampled_from(list("abc-]!^\\/.[1@:x"))


@given(st.lists(_pattern_tokens, max_size=8).map("".join), st.lists(_text_chars, max_size=8).map("".join))
def test_wildcards_agree_with_libc(pattern, text):
    """For random ASCII patterns and texts, matching equals glibc's fnmatch with flags 0."""
    assert bool(compile_wildcard(pattern).match(text.encode())) == libc_fnmatch(pattern, text)


def test_wildcard_question_mark_is_one_byte():
    """'?' matches one byte, as in jabberd2's C locale: 'é' needs '??'."""
    assert not compile_wildcard("?").match("é".encode())
    assert compile_wildcard("??").match("é".encode())
