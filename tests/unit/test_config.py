"""Unit tests for jrouter.config: router.xml semantics, validation and router-users.xml."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jrouter.routing.access import AccessRule, AccessRules, RateLimit
from jrouter.config import (
    DEFAULT_CIPHERS,
    Alias,
    Config,
    ConfigError,
    LogSettings,
    load_config,
    load_users,
)

DATA = Path(__file__).parent / "data" / "config"
REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, body, name="router.xml"):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return str(path)


def load(tmp_path, body, **kw):
    return load_config(write(tmp_path, body), **kw)


def problems(tmp_path, body, **kw):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, body, **kw)
    return info.value.problems


# --- defaults and every key ----------------------------------------------


def test_empty_root_gives_all_defaults(tmp_path):
    """A router.xml with only a root element yields jabberd2's defaults (protocol §2.2)."""
    path = write(tmp_path, "<router/>")
    config = load_config(path)
    assert config == Config(source=path)
    assert config.id == "router"
    assert config.pidfile is None
    assert config.log == LogSettings("stdout", "jabberd/router", "local7", None)
    assert (config.ip, config.port) == ("0.0.0.0", 5347)
    assert config.users_file == "/etc/jabberd2/router-users.xml"
    assert config.secret is None and config.pemfile is None and config.private_key_password is None
    assert config.ciphers == DEFAULT_CIPHERS
    assert config.max_fds == 1024
    assert config.bytes_limit == RateLimit(0, 5, 5) == config.connects_limit
    assert config.stanza_size_limit == 1048576
    assert config.access == AccessRules("allow,deny", (), ())
    assert (config.check_interval, config.keepalive) == (60, 0)
    assert config.aliases == ()
    assert dict(config.acls) == {}
    assert config.filter_file == "/etc/jabberd2/router-filter.xml"
    assert config.message_logging_enabled is False and config.message_logging_file is None


def test_every_key_is_read():
    """Each key of protocol §2.2 (and <stanzasize>) lands in its Config field."""
    config = load_config(str(DATA / "full.xml"))
    assert config.id == "test-router"
    assert config.pidfile == "/run/jr/test-router.pid"
    assert config.log == LogSettings("syslog", "jr/test-router", "local2", "/var/log/jr.log", "/var/log/jr-debug.log")
    assert (config.ip, config.port) == ("::1", 15347)
    assert config.users_file == "/etc/jr/users.xml"
    assert config.secret == "s3cret"
    assert config.pemfile == "/etc/jr/server.pem"
    assert config.private_key_password == "pw"
    assert config.ciphers == "HIGH:!aNULL"
    assert (config.check_interval, config.keepalive) == (30, 120)
    assert config.max_fds == 256
    assert config.bytes_limit == RateLimit(10000, 2, 3)
    assert config.connects_limit == RateLimit(3, 10, 7)
    assert config.stanza_size_limit == 65536
    assert config.access == AccessRules(
        "deny,allow",
        (AccessRule.parse("127.0.0.0", "255.0.0.0"), AccessRule.parse("::1", "128")),
        (AccessRule.parse("127.0.0.2"),),
    )
    assert config.aliases == (
        Alias("conference.example.com", "muclinker"),
        Alias("lalias.example.com", "legacy.example.com"),
    )
    assert dict(config.acls) == {
        "all": {"jabberd"},
        "bind": {"sm", "c2s"},
        "default-route": {"s2s"},
        "log": {"msglog"},
    }
    assert config.filter_file == "/etc/jr/filter.xml"
    assert config.message_logging_enabled is True
    assert config.message_logging_file == "/var/log/jr-messages.log"
    assert config.message_logging is True


def test_debian_router_xml_loads():
    """Debian's shipped /etc/jabberd2/router.xml loads with the values protocol §2.6 lists."""
    config = load_config("/etc/jabberd2/router.xml")
    assert (config.ip, config.port, config.secret) == ("0.0.0.0", 5347, "secret")
    assert config.log == LogSettings("file", "jabberd/router", "local3", "/var/log/jabberd2/router.log", None)
    assert config.pidfile == "/var/run/jabberd2/router.pid"
    assert (config.check_interval, config.keepalive) == (60, 0)
    assert not config.bytes_limit.enabled and not config.connects_limit.enabled
    assert dict(config.acls) == {"all": {"jabberd"}}
    assert config.aliases == ()
    assert config.filter_file == "/etc/jabberd2/router-filter.xml"


def test_shipped_dist_config_loads():
    """conf/router.xml.dist loads: loopback 5347, stdout log, no pidfile."""
    config = load_config(str(REPO / "conf" / "router.xml.dist"))
    assert (config.ip, config.port) == ("127.0.0.1", 5347)
    assert config.log.type == "stdout"
    assert config.pidfile is None
    assert config.acl_allows("bind", "jabberd")
    assert config.stanza_size_limit == 1048576


def test_shipped_dist_users_load():
    """conf/router-users.xml.dist holds jabberd/secret."""
    result = load_users(str(REPO / "conf" / "router-users.xml.dist"))
    assert result.users == {"jabberd": "secret"}


# --- how the file is read (protocol §2.1) --------------------------------


def test_root_name_ignored_and_unknown_elements_skipped(tmp_path):
    """Any root name works and unknown elements (even with children) are ignored."""
    config = load(tmp_path, "<whatever><sm><id>x</id></sm><local><port>1234</port><cachain>c</cachain></local></whatever>")
    assert config.port == 1234
    assert config.id == "router"


def test_first_value_wins(tmp_path):
    """A repeated element: the first occurrence is used."""
    config = load(tmp_path, "<r><local><port>1111</port><port>2222</port></local><local><port>3333</port></local></r>")
    assert config.port == 1111


def test_empty_element_means_one(tmp_path):
    """An element without text has the value "1" (so <enabled/> enables)."""
    config = load(tmp_path, "<r><local><port/></local><message_logging><enabled/></message_logging></r>")
    assert config.port == 1
    assert config.message_logging_enabled
    assert not config.message_logging  # no <file>


def test_values_are_not_trimmed(tmp_path):
    """String values keep their whitespace, as jabberd2 does."""
    config = load(tmp_path, "<r><local><secret> s </secret></local></r>")
    assert config.secret == " s "


def test_text_split_by_comment_and_cdata_is_joined(tmp_path):
    """Text around comments and CDATA sections forms one value (verified against jabberd2)."""
    config = load(tmp_path, "<r><pidfile>/tmp/a<!-- c -->b<![CDATA[&x]]>&amp;.pid</pidfile></r>")
    assert config.pidfile == "/tmp/ab&x&.pid"


def test_default_namespace_on_root_is_harmless(tmp_path):
    """A default namespace does not change the keys (jabberd2's expat ignores namespaces here)."""
    config = load(tmp_path, "<r xmlns='urn:x'><local><port>999</port></local></r>")
    assert config.port == 999


def test_prefixed_elements_are_other_keys(tmp_path):
    """<x:port> is the key local.x:port, not local.port."""
    config = load(tmp_path, "<r xmlns:x='urn:x'><local><x:port>999</x:port></local></r>")
    assert config.port == 5347


# --- ${} expansion -------------------------------------------------------


def test_expansion_of_later_key_is_an_error(tmp_path):
    """A key defined only later in the document is undefined (file, line and key reported)."""
    path = write(tmp_path, "<r>\n<pidfile>/run/${local.ip}.pid</pidfile>\n<local><ip>::</ip></local></r>")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:2: pidfile: ${{local.ip}} is not defined (no <local.ip> element before this one)"]


def test_expansion_first_value_and_nested_keys(tmp_path):
    """Expansion picks the first value and works with dotted keys."""
    config = load(tmp_path, "<r><id>a</id><id>b</id><local><ip>::</ip></local><pidfile>/run/${id}-${local.ip}.pid</pidfile></r>")
    assert config.pidfile == "/run/a-::.pid"


def test_id_override_seeds_id(tmp_path):
    """-i is seeded before the file, so it wins over <id> and feeds ${id}."""
    config = load(tmp_path, "<r><id>file</id><pidfile>/run/${id}.pid</pidfile></r>", id_override="cli")
    assert config.id == "cli"
    assert config.pidfile == "/run/cli.pid"


def test_id_override_defines_id_without_element(tmp_path):
    """${id} resolves from -i even when the file has no <id>."""
    config = load(tmp_path, "<r><pidfile>/run/${id}.pid</pidfile></r>", id_override="x")
    assert config.pidfile == "/run/x.pid"


def test_expansion_rescans_the_result(tmp_path):
    """After a substitution the whole value is scanned again (verified: "$"+"{a}" expands)."""
    config = load(tmp_path, "<r><a>$</a><pidfile>/p-${a}{a}.pid</pidfile></r>")
    assert config.pidfile == "/p-$.pid"


def test_missing_closing_brace(tmp_path):
    """'${' without '}' is an error with file, line and key."""
    path = write(tmp_path, "<r>\n\n<local><users>/etc/${id</users></local></r>")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:3: local.users: '${{' without a closing '}}'"]


def test_expansion_in_unknown_element_is_checked(tmp_path):
    """jabberd2 expands every element, so an undefined ${} anywhere refuses the file."""
    assert "foo.bar" in problems(tmp_path, "<r><foo><bar>${x}</bar></foo></r>")[0]


def test_failed_expansion_does_not_cascade(tmp_path):
    """A key whose expansion failed is reported once, not again where it is used."""
    found = problems(tmp_path, "<r><a>${x}</a><pidfile>${a}</pidfile></r>")
    assert len(found) == 1 and ": a: " in found[0]


def test_attributes_are_not_expanded(tmp_path):
    """${} in attributes stays literal, as in jabberd2 (here it makes an invalid alias)."""
    [problem] = problems(tmp_path, "<r><id>sm</id><aliases><alias name='a.example' target='${id}'/></aliases></r>")
    assert "'${id}' is not a domain name" in problem


# --- errors --------------------------------------------------------------


def test_all_problems_reported_together():
    """Every bad value in a file is reported at once, each with file:line: element."""
    path = str(DATA / "errors.xml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = info.value.problems
    expected = [
        (3, "local.ip:", "not an IPv4 or IPv6 address"),
        (4, "local.port:", "between 1 and 65535"),
        (7, "check.interval:", "expected an integer"),
        (11, "io.limits.bytes@seconds:", "expected an integer"),
        (14, "io.access.allow@mask:", "not contiguous"),
        (17, "pidfile:", "${nope} is not defined"),
        (19, "aliases.alias@name:", "not a domain name"),
    ]
    assert len(found) == len(expected), found
    for line, key, text in expected:
        assert any(p.startswith(f"{path}:{line}: {key}") and text in p for p in found), (line, key, found)
    assert str(info.value) == "\n".join(found)


def test_cannot_open(tmp_path):
    """A missing file is a ConfigError worded like jabberd2's."""
    path = str(tmp_path / "nope.xml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"couldn't open {path} for reading: No such file or directory"]


def test_not_well_formed(tmp_path):
    """A parse error names the file and line."""
    path = write(tmp_path, "<r>\n<local>\n<port>1</local>\n</r>")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:3: parse error: ")
    assert "mismatch" in problem


def test_parse_error_line_not_taken_from_earlier_parse(tmp_path):
    """Each file's parse error reports its own line, not one left over from a previous parse."""
    problems(tmp_path, "<r><a></r>")
    [problem] = problems(tmp_path, "<r>\n\n\n<a></r>")
    assert ":4: parse error: " in problem


def test_empty_file(tmp_path):
    """An empty router.xml is a parse error."""
    assert "parse error" in problems(tmp_path, "")[0]


def test_doctype_refused(tmp_path):
    """DTDs and entities are never processed: a DOCTYPE is refused."""
    body = '<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY e "x">]>\n<r><secret>&e;</secret></r>'
    [problem] = problems(tmp_path, body)
    assert ":2: parse error: DOCTYPE" in problem


def test_external_entity_not_resolved(tmp_path):
    """An undeclared entity reference is a parse error, never a file read."""
    assert "parse error" in problems(tmp_path, "<r><secret>&xxe;</secret></r>")[0]


@pytest.mark.parametrize(
    "xml, key",
    [
        ("<local><port>0</port></local>", "local.port"),
        ("<local><port>5347abc</port></local>", "local.port"),
        ("<local><port>  </port></local>", "local.port"),
        ("<local><ip> 127.0.0.1</ip></local>", "local.ip"),
        ("<local><ip>example.com</ip></local>", "local.ip"),
        ("<io><max_fds>0</max_fds></io>", "io.max_fds"),
        ("<io><limits><stanzasize>-1</stanzasize></limits></io>", "io.limits.stanzasize"),
        ("<io><limits><queue>-1</queue></limits></io>", "io.limits.queue"),
        ("<io><limits><connects>-3</connects></limits></io>", "io.limits.connects"),
        ("<io><limits><connects throttle='-1'>3</connects></limits></io>", "io.limits.connects@throttle"),
        ("<check><keepalive>-5</keepalive></check>", "check.keepalive"),
        ("<check><interval>1_000</interval></check>", "check.interval"),
        ("<message_logging><enabled>yes</enabled></message_logging>", "message_logging.enabled"),
        ("<io><access><order>deny, allow</order></access></io>", "io.access.order"),
        ("<io><access><deny mask='8'/></access></io>", "io.access.deny"),
        ("<io><access><deny ip='10.0.0.300'/></access></io>", "io.access.deny@ip"),
        ("<io><access><allow ip='10.0.0.0' mask='x'/></access></io>", "io.access.allow@mask"),
        ("<io><access><allow ip='::' mask='129'/></access></io>", "io.access.allow@mask"),
        ("<aliases><alias name='a.example'/></aliases>", "aliases.alias"),
        ("<aliases><alias name='a@b' target='t'/></aliases>", "aliases.alias@name"),
        ("<aliases><alias name='a' target='x/y'/></aliases>", "aliases.alias@target"),
        ("<log type='file'/>", "log@type"),
    ],
)
def test_invalid_values(tmp_path, xml, key):
    """Garbage that jabberd2 would silently turn into 0 (or worse) is reported with its key."""
    [problem] = problems(tmp_path, f"<r>\n{xml}</r>")
    assert f":2: {key}: " in problem


def test_duplicate_alias(tmp_path):
    """The same alias name twice (case-insensitively) is an error naming the first line."""
    [problem] = problems(tmp_path, "<r><aliases>\n<alias name='a.x' target='t'/>\n<alias name='A.X' target='u'/></aliases></r>")
    assert ":3: aliases.alias@name: alias 'a.x' is already defined on line 2" in problem


@pytest.mark.parametrize("text, value", [(" 42", 42), ("42 ", 42), ("\n\t42\n", 42), ("+42", 42)])
def test_numbers_accept_surrounding_whitespace(tmp_path, text, value):
    """Numbers may carry surrounding whitespace, as atoi's leading-space skip allows."""
    assert load(tmp_path, f"<r><check><keepalive>{text}</keepalive></check></r>").keepalive == value


@given(st.integers(1, 65535), st.sampled_from(["", " ", "\n  "]))
def test_any_valid_port_loads(port, pad):
    """Every port 1..65535, padded or not, loads as that number."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.xml")
        with open(path, "w") as f:
            f.write(f"<r><local><port>{pad}{port}{pad}</port></local></r>")
        assert load_config(path).port == port


# --- log -----------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [("stdout", "stdout"), ("file", "file"), ("syslog", "syslog"), ("SysLog", "stdout"), ("bogus", "stdout")])
def test_log_type(tmp_path, kind, expected):
    """log@type is file or syslog (case-sensitive); anything else is stdout."""
    config = load(tmp_path, f"<r><log type='{kind}'><file>/tmp/x.log</file></log></r>")
    assert config.log.type == expected


def test_log_without_type_is_stdout(tmp_path):
    """<log> without type logs to stdout."""
    assert load(tmp_path, "<r><log><file>/x</file></log></r>").log.type == "stdout"


@pytest.mark.parametrize("facility, expected", [("local0", "local0"), ("LOCAL5", "local5"), ("log_user", "log_user"), ("daemon", "local7"), ("", "local7")])
def test_syslog_facility(tmp_path, facility, expected):
    """Facility names are case-insensitive; unknown ones become local7 without an error."""
    body = f"<r><log type='syslog'><facility>{facility}</facility></log></r>" if facility else "<r><log type='syslog'/></r>"
    assert load(tmp_path, body).log.facility == expected


# --- limits --------------------------------------------------------------


def test_limit_attributes_default_to_five(tmp_path):
    """bytes/connects without seconds/throttle get 5 and 5."""
    config = load(tmp_path, "<r><io><limits><bytes>100</bytes><connects>2</connects></limits></io></r>")
    assert config.bytes_limit == RateLimit(100, 5, 5)
    assert config.connects_limit == RateLimit(2, 5, 5)


def test_disabled_limit_ignores_attributes(tmp_path):
    """A total of 0 disables the limit; its attributes are not even read (as jabberd2)."""
    config = load(tmp_path, "<r><io><limits><bytes seconds='junk'>0</bytes></limits></io></r>")
    assert config.bytes_limit == RateLimit()
    assert not config.bytes_limit.enabled


def test_stanzasize_zero_means_unlimited(tmp_path):
    """<stanzasize>0</stanzasize> is accepted (0 = no limit)."""
    assert load(tmp_path, "<r><io><limits><stanzasize>0</stanzasize></limits></io></r>").stanza_size_limit == 0


# --- access --------------------------------------------------------------


def test_access_rules_built_in_order(tmp_path):
    """allow/deny rules keep file order and apply with the configured order."""
    config = load(
        tmp_path,
        "<r><io><access><order>deny,allow</order><allow ip='10.0.0.0' mask='8'/>"
        "<allow ip='192.168.1.1'/><deny ip='10.0.0.66'/></access></io></r>",
    )
    assert [str(r.address) for r in config.access.allow] == ["10.0.0.0", "192.168.1.1"]
    assert config.access.allows("10.1.2.3")
    assert config.access.allows("::ffff:10.1.2.3")
    assert not config.access.allows("10.0.0.66")
    assert not config.access.allows("192.168.1.2")


def test_access_order_whitespace_tolerated(tmp_path):
    """Surrounding whitespace around the order value is accepted."""
    assert load(tmp_path, "<r><io><access><order> deny,allow\n</order></access></io></r>").access.order == "deny,allow"


# --- aliases -------------------------------------------------------------


def test_aliases_lower_cased_in_file_order(tmp_path):
    """Alias names and targets are lower-cased and kept in file order."""
    config = load(tmp_path, "<r><aliases><alias name='B.Example' target='Sm'/><alias name='a.example' target='c2s'/></aliases></r>")
    assert config.aliases == (Alias("b.example", "sm"), Alias("a.example", "c2s"))


# --- ACLs (protocol §2.4) ------------------------------------------------


def test_last_acl_of_a_type_wins(tmp_path):
    """A second <acl> of the same type replaces the first (not merged)."""
    config = load(tmp_path, "<r><aci><acl type='bind'><user>a</user></acl><acl type='bind'><user>b</user></acl></aci></r>")
    assert dict(config.acls) == {"bind": {"b"}}


def test_acl_without_users_does_not_replace(tmp_path):
    """An <acl> whose users are all empty is not stored, so an earlier one stays."""
    config = load(tmp_path, "<r><aci><acl type='log'><user>a</user></acl><acl type='log'><user/><user></user></acl></aci></r>")
    assert dict(config.acls) == {"log": {"a"}}


def test_acl_empty_users_and_typeless_acls_skipped(tmp_path):
    """Empty <user> elements and <acl> without type are skipped."""
    config = load(tmp_path, "<r><aci><acl><user>x</user></acl><acl type='bind'><user></user><user>y</user></acl></aci></r>")
    assert dict(config.acls) == {"bind": {"y"}}


def test_acl_users_are_raw_text(tmp_path):
    """ACL user names are read from the tree: untrimmed and never ${}-expanded."""
    config = load(tmp_path, "<r><id>i</id><aci><acl type='all'><user> a </user><user>${id}</user></acl></aci></r>")
    assert config.acls["all"] == {" a ", "${id}"}


def test_acl_type_truncated_to_32(tmp_path):
    """ACL type names are cut to 32 characters, as aci_load's buffer does."""
    config = load(tmp_path, f"<r><aci><acl type='{'t' * 40}'><user>u</user></acl></aci></r>")
    assert list(config.acls) == ["t" * 32]


def test_only_first_aci_section_read(tmp_path):
    """Only the first <aci> element is consulted."""
    config = load(tmp_path, "<r><aci><acl type='a'><user>1</user></acl></aci><aci><acl type='b'><user>2</user></acl></aci></r>")
    assert dict(config.acls) == {"a": {"1"}}


def test_acl_allows():
    """acl_allows: the user is in 'all' or in the named list; exact, case-sensitive."""
    from types import MappingProxyType

    config = Config(acls=MappingProxyType({"all": frozenset({"root"}), "log": frozenset({"logger"})}))
    assert config.acl_allows("bind", "root")
    assert config.acl_allows("log", "logger")
    assert not config.acl_allows("bind", "logger")
    assert not config.acl_allows("log", "Logger")
    assert not config.acl_allows(None, "logger")


# --- router-users.xml (protocol §2.3) ------------------------------------


def test_users_table_cases():
    """Valid users load; malformed ones are skipped with one message each; duplicates overwrite."""
    result = load_users(str(DATA / "users.xml"))
    assert result.users == {"jabberd": "secret", "c2s": "two", " spaced ": " pw "}
    malformed = ("error", "malformed user entry in user table file, skipping")
    assert result.messages == [malformed, malformed, ("notice", "loaded user table (4 users)")]


def test_users_missing_file(tmp_path):
    """A missing users file gives an empty table and jabberd2's error line."""
    path = str(tmp_path / "none.xml")
    result = load_users(path)
    assert result.users == {}
    assert result.messages == [("error", f"couldn't open user table file {path}: No such file or directory")]


def test_users_empty_file(tmp_path):
    """An empty users file gives 'empty user table file FILE'."""
    path = write(tmp_path, "", "users.xml")
    assert load_users(path).messages == [("error", f"empty user table file {path}")]


@pytest.mark.parametrize("body", ["<users><user>", "   ", '<!DOCTYPE u [<!ENTITY e "x">]><users/>'])
def test_users_unparsable(tmp_path, body):
    """Malformed XML (or a DTD) gives 'couldn't parse user table' and no users."""
    result = load_users(write(tmp_path, body, "users.xml"))
    assert result == type(result)({}, [("error", "couldn't parse user table")])


def test_users_namespaces_ignored(tmp_path):
    """Element names are compared without namespace, as nad_parse does."""
    body = "<u:users xmlns:u='urn:u'><u:user><name>a</name><u:secret>b</u:secret></u:user></u:users>"
    assert load_users(write(tmp_path, body, "users.xml")).users == {"a": "b"}


def test_users_first_name_and_secret(tmp_path):
    """Only the first <name> and <secret> of a user count."""
    body = "<users><user><name>a</name><name>b</name><secret>1</secret><secret>2</secret></user></users>"
    assert load_users(write(tmp_path, body, "users.xml")).users == {"a": "1"}


def test_components_section_sets_per_name_stanza_namespaces(tmp_path):
    """<components><component name namespace/> (ours) maps XEP-0114 names, in nameprep form."""
    config = load(tmp_path, "<r><components><component name='Old.Example.COM' namespace='jabber:client'/>"
                            "<component name='new.example.com' namespace='jabber:component:accept'/>"
                            "</components></r>")
    assert dict(config.component_namespaces) == {"old.example.com": "jabber:client",
                                                 "new.example.com": "jabber:component:accept"}
    assert dict(load(tmp_path, "<r/>").component_namespaces) == {}


def test_components_section_problems_name_line_and_element(tmp_path):
    """Missing or unknown attributes, an unknown namespace and a repeated name are all reported."""
    found = problems(tmp_path, "<r><components>\n"
                               "<component namespace='jabber:client'/>\n"
                               "<component name='a.example' namespace='jabber:server'/>\n"
                               "<component name='b.example' namespace='jabber:client' mode='x'/>\n"
                               "<component name='c.example' namespace='jabber:client'/>\n"
                               "<component name='c.example' namespace='jabber:client'/>\n"
                               "</components></r>")
    assert any(":2: components.component: missing the name attribute" in p for p in found)
    assert any(":3: components.component@namespace: 'jabber:server' is not one of" in p for p in found)
    assert any(":4: components.component: unknown attribute 'mode'" in p for p in found)
    assert any(":6: components.component@name: component 'c.example' is already listed on line 5" in p
               for p in found)


def test_queue_bound_default_value_and_zero(tmp_path):
    """<io><limits><queue>: 16 MiB by default, any byte count, 0 for unbounded."""
    assert load(tmp_path, "<r/>").queue_limit == 16 * 1024 * 1024
    assert load(tmp_path, "<r><io><limits><queue>1048576</queue></limits></io></r>").queue_limit == 1048576
    assert load(tmp_path, "<r><io><limits><queue>0</queue></limits></io></r>").queue_limit == 0


def test_clustering_state_dir(tmp_path):
    """<clustering state-dir='DIR'>: where placement's slots are kept over a restart (§6.10)."""
    config = load(tmp_path, "<router><clustering state-dir='/var/lib/jrouter'>"
                            "<policy name='example.com' algorithm='consistent'/></clustering></router>")
    assert config.placement_state_dir == "/var/lib/jrouter"
    assert load(tmp_path, "<router><clustering/></router>").placement_state_dir is None
    found = problems(tmp_path, "<router><clustering state-dir='var/lib'/></router>")
    assert any("clustering@state-dir: must be an absolute directory path, got 'var/lib'" in p
               for p in found), found
