"""jrouter.routing.message_log: jabberd2's message log (protocol §7.1), line by line and on disk.

The expected lines of ``JABBERD2_CASES`` are what Debian's jabberd2-router
2.7.0 wrote for the same routes (two components on loopback, TZ=Europe/Berlin);
the timestamps were replaced by the fixed one used here.
"""

import os
import stat
import time

import pytest

from jrouter.ops.message_log_file import MessageLog
from jrouter.routing.message_log import HEADER, message_log_line, route_body, wanted
from jrouter.wire.xmlstream import StreamReader

NS_C = "http://jabberd.jabberstudio.org/ns/component/1.0"
# Wed Nov 25 07:09:31 2026 UTC.
T0 = 1795590571
STAMP = "2026-11-25T08:09:31+0100"


@pytest.fixture(autouse=True)
def berlin(monkeypatch):
    """Run every test with local time = Europe/Berlin (UTC+1 in November)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def routes(*texts):
    """Elements as the core gets them from a jabberd2 component's stream."""
    reader = StreamReader()
    reader.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                b"xmlns='%s'>" % NS_C.encode())
    return reader.feed("".join(texts).encode())


def route(inner, to="b.test", from_="a.test"):
    (element,) = routes(f"<route to='{to}' from='{from_}'>{inner}</route>")
    return element


def msg(body="<body>hi</body>", from_="u@a.test/r", to="x@b.test/r", name="message"):
    return f"<{name} xmlns='jabber:client' from='{from_}' to='{to}'>{body}</{name}>"


def line_for(element, when=None):
    return message_log_line(element.attrs, element.child_name, element.child_attrs,
                            route_body(element.tree()), time.localtime(T0 if when is None else when))


# (route to, route payload, line jabberd2 wrote or None)
JABBERD2_CASES = [
    ("b.test", msg("<body>one\ntwo &amp; three &lt;x&gt; \u00fc</body>", "User@A.test/Res", "x@B.TEST/r"),
     f"{STAMP} user@a.test/Res x@b.test/r one\x01two & three <x> \u00fc\n"),
    ("c2s.test", msg("<body>to c2s</body>", to="x@c2s.test/r"), None),
    ("b.test", msg("<subject>no body</subject>"), None),
    ("b.test", msg("<body/>"), f"{STAMP} u@a.test/r x@b.test/r \n"),
    ("b.test", msg("<body xmlns='urn:other'>other ns</body>"), f"{STAMP} u@a.test/r x@b.test/r other ns\n"),
    ("b.test", msg("<body>before<b>inner</b>after</body>"), f"{STAMP} u@a.test/r x@b.test/r before\n"),
    ("b.test", msg("<html><body>nested</body></html><body>second</body>"),
     f"{STAMP} u@a.test/r x@b.test/r second\n"),
    ("b.test", msg("<body>bad from</body>", from_="@bad"), None),
    ("b.test", "<message xmlns='jabber:client' to='x@b.test/r'><body>no from</body></message>", None),
    ("b.test", msg("<body>presence</body>", name="presence"), None),
    ("b.test", msg("<body>cr&#13;lf&#10;tab\tend</body>", "u@a.test", "b.test"),
     f"{STAMP} u@a.test b.test cr\rlf\x01tab\tend\n"),
    ("b.test", msg("<body>  spaces  </body><body>two bodies</body>"),
     f"{STAMP} u@a.test/r x@b.test/r   spaces  \n"),
    ("b.test", msg("<body><![CDATA[cdata <b>]]></body>"), f"{STAMP} u@a.test/r x@b.test/r cdata <b>\n"),
    ("b.test", "<x:message xmlns:x='urn:foo' from='u@a.test/r' to='x@b.test/r'>"
               "<body>prefixed other-ns message</body></x:message>",
     f"{STAMP} u@a.test/r x@b.test/r prefixed other-ns message\n"),
]


@pytest.mark.parametrize("to, inner, expected", JABBERD2_CASES)
def test_lines_match_jabberd2(to, inner, expected):
    """Each route gives the line the real jabberd2-router wrote for it, or none."""
    assert line_for(route(inner, to=to)) == expected


def test_newlines_become_byte_01():
    """Every newline of the body is replaced by 0x01, so one message is one line."""
    line = line_for(route(msg("<body>\na\n\nb\n</body>")))
    assert line == f"{STAMP} u@a.test/r x@b.test/r \x01a\x01\x01b\x01\n"
    assert line.count("\n") == 1


def test_route_to_c2s_prefix_is_skipped():
    """A route whose 'to' starts with 'c2s' is not logged (c2s logs it)."""
    assert line_for(route(msg(), to="c2s")) is None
    assert line_for(route(msg(), to="c2sfoo.example.com")) is None
    assert line_for(route(msg(), to="c2.example.com")) is not None


def test_missing_body_is_skipped():
    """A message without a <body> child gives no line."""
    assert line_for(route(msg("<subject>s</subject><thread>t</thread>"))) is None
    assert message_log_line({"to": "b", "from": "a"}, "jabber:client message",
                            {"from": "a@a", "to": "b@b"}, None, time.localtime(T0)) is None


def test_route_without_from_or_to_is_skipped():
    """The route itself needs both addresses, and valid ones."""
    attrs = {"from": "u@a.test", "to": "x@b.test"}
    now = time.localtime(T0)
    assert message_log_line({"to": "b.test"}, "message", attrs, "x", now) is None
    assert message_log_line({"from": "a.test"}, "message", attrs, "x", now) is None
    assert message_log_line({"from": "a.test", "to": "@b"}, "message", attrs, "x", now) is None


def test_message_needs_valid_to():
    """A message whose 'to' is missing or invalid is not logged."""
    assert line_for(route("<message xmlns='jabber:client' from='u@a.test'><body>x</body></message>")) is None
    assert line_for(route(msg(to="x@/r"))) is None


def test_timestamp_is_local_time_with_offset(monkeypatch):
    """The stamp is local time with a numeric UTC offset (strftime %z)."""
    monkeypatch.setenv("TZ", "America/St_Johns")
    time.tzset()
    assert line_for(route(msg())).startswith("2026-11-25T03:39:31-0330 ")


def test_wanted_is_the_cheap_precheck():
    """wanted() looks only at names and the route's addresses."""
    assert wanted({"to": "b.test", "from": "a.test"}, "jabber:client message")
    assert wanted({"to": "b.test", "from": "a.test"}, "message")
    assert not wanted({"to": "b.test", "from": "a.test"}, "jabber:client iq")
    assert not wanted({"to": "c2s.test", "from": "a.test"}, "jabber:client message")
    assert not wanted({"to": "b.test"}, "jabber:client message")
    assert not wanted({"to": "b.test", "from": "a.test"}, None)


# -- the file -----------------------------------------------------------------


def test_new_file_gets_header_and_mode_0600(tmp_path):
    """A file that does not exist yet starts with jabberd2's three header lines, mode 0600."""
    path = tmp_path / "messages.log"
    old = os.umask(0o022)
    try:
        assert MessageLog(str(path)).write("first\n")
        assert os.umask(0o022) == 0o022        # the process umask is left alone
    finally:
        os.umask(old)
    assert path.read_text() == HEADER + "first\n"
    assert HEADER.splitlines() == [
        "# This message log is created by the jabberd router.",
        "# See router.xml for logging options.",
        "# Format: DateTime FromJID ToJID MessageBody<line end>",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_mode_0600_even_with_a_strange_umask(tmp_path):
    """The new file is 0600 whatever umask the process runs with."""
    path = tmp_path / "messages.log"
    old = os.umask(0o277)
    try:
        MessageLog(str(path)).write("x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_file_is_appended_without_header(tmp_path):
    """An existing file (even empty, e.g. after logrotate's create) gets no header and keeps its mode."""
    path = tmp_path / "messages.log"
    path.write_text("")
    path.chmod(0o640)
    log = MessageLog(str(path))
    log.write("one\n")
    log.write("two\n")
    assert path.read_text() == "one\ntwo\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_file_is_reopened_per_message(tmp_path):
    """After the file is moved away (logrotate), the next message starts a new one."""
    path = tmp_path / "messages.log"
    log = MessageLog(str(path))
    log.write("before\n")
    os.rename(path, tmp_path / "messages.log.1")
    log.write("after\n")
    assert (tmp_path / "messages.log.1").read_text() == HEADER + "before\n"
    assert path.read_text() == HEADER + "after\n"


def test_log_route_writes_jabberd2_lines(tmp_path):
    """log_route() writes what jabberd2 writes for a sequence of routes, header first."""
    path = tmp_path / "messages.log"
    log = MessageLog(str(path), localtime=lambda: time.localtime(T0))
    written = [log.log_route(route(inner, to=to)) for to, inner, _ in JABBERD2_CASES]
    assert written == [expected is not None for _, _, expected in JABBERD2_CASES]
    expected = HEADER + "".join(e for _, _, e in JABBERD2_CASES if e is not None)
    assert path.read_bytes() == expected.encode("utf-8")


def test_log_route_does_not_parse_what_is_not_a_message(tmp_path):
    """Packets that fail the cheap checks are never parsed into a tree."""

    class Untouchable:
        attrs = {"to": "b.test", "from": "a.test"}
        child_name = "jabber:client iq"
        child_attrs = {}

        def tree(self):
            raise AssertionError("parsed")

    assert MessageLog(str(tmp_path / "m.log")).log_route(Untouchable()) is False
    assert not (tmp_path / "m.log").exists()


def test_unwritable_file_is_reported_not_raised(tmp_path):
    """A log file that cannot be opened gives jabberd2's error line; routing goes on."""
    errors = []

    class Log:
        def error(self, text):
            errors.append(text)

    log = MessageLog(str(tmp_path / "missing-dir" / "m.log"), log=Log())
    assert log.write("x\n") is False
    assert errors == ["Unable to open message log for writing: No such file or directory"]
