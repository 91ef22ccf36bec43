"""router.xml's limits before authentication (ours, protocol §2.2 and §3.10)."""

from pathlib import Path

import pytest

from jrouter.config import ConfigError, load_config
from jrouter.routing.access import RateLimit
from jrouter.routing.guard import AuthLimits

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path, body):
    path = tmp_path / "router.xml"
    path.write_text(body, encoding="utf-8")
    return load_config(str(path))


def problems(tmp_path, body):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, body)
    return info.value.problems


def limits(xml):
    return f"<r>\n<io><limits>\n{xml}\n</limits></io>\n</r>"


def test_defaults_when_absent(tmp_path):
    """Without the elements: 30 s, 16384 bytes, 64 connections, 3 per connection, 10 in 60 s -> 300 s."""
    assert load(tmp_path, "<r/>").auth_limits == AuthLimits(30, 16384, 64, 3, RateLimit(10, 60, 300))


def test_every_element_is_read(tmp_path):
    """Each of <authtimeout>, <authstanzasize>, <unauthenticated>, <authattempts>, <authfailures> lands in AuthLimits."""
    config = load(tmp_path, limits(
        "<authtimeout>5</authtimeout><authstanzasize>4096</authstanzasize>"
        "<unauthenticated>8</unauthenticated><authattempts>2</authattempts>"
        "<authfailures seconds='30' throttle='600'>5</authfailures>"))
    assert config.auth_limits == AuthLimits(5, 4096, 8, 2, RateLimit(5, 30, 600))


def test_authfailures_attributes_default_to_60_and_300(tmp_path):
    """<authfailures>4</authfailures> keeps its own defaults, not <connects>' 5 and 5."""
    assert load(tmp_path, limits("<authfailures>4</authfailures>")).auth_limits.failures == RateLimit(4, 60, 300)


def test_zero_turns_each_limit_off(tmp_path):
    """0 is accepted everywhere and disables that limit."""
    config = load(tmp_path, limits(
        "<authtimeout>0</authtimeout><authstanzasize>0</authstanzasize>"
        "<unauthenticated>0</unauthenticated><authattempts>0</authattempts>"
        "<authfailures seconds='9'>0</authfailures>"))
    assert config.auth_limits == AuthLimits(0, 0, 0, 0, RateLimit())
    assert not config.auth_limits.failures.enabled


@pytest.mark.parametrize("xml, key", [
    ("<authtimeout>-1</authtimeout>", "io.limits.authtimeout"),
    ("<authstanzasize>16k</authstanzasize>", "io.limits.authstanzasize"),
    ("<unauthenticated>many</unauthenticated>", "io.limits.unauthenticated"),
    ("<authattempts>1.5</authattempts>", "io.limits.authattempts"),
    ("<authfailures>-2</authfailures>", "io.limits.authfailures"),
    ("<authfailures seconds='x'>3</authfailures>", "io.limits.authfailures@seconds"),
    ("<authfailures throttle='-1'>3</authfailures>", "io.limits.authfailures@throttle"),
])
def test_invalid_values_name_file_line_and_element(tmp_path, xml, key):
    """Garbage in a pre-authentication limit is an error with file, line and element path."""
    [problem] = problems(tmp_path, limits(xml))
    assert problem.startswith(str(tmp_path / "router.xml") + f":3: {key}: ")


def test_all_problems_are_reported_together(tmp_path):
    """Two bad limits give two problems."""
    found = problems(tmp_path, limits("<authtimeout>x</authtimeout>\n<authattempts>-1</authattempts>"))
    assert [p.split(": ")[1] for p in found] == ["io.limits.authtimeout", "io.limits.authattempts"]


def test_shipped_dist_config_sets_the_defaults():
    """conf/router.xml.dist writes every pre-authentication limit with its default value."""
    config = load_config(str(REPO / "conf" / "router.xml.dist"))
    assert config.auth_limits == AuthLimits()
    text = (REPO / "conf" / "router.xml.dist").read_text()
    for element in ("authtimeout", "authstanzasize", "unauthenticated", "authattempts", "authfailures"):
        assert f"<{element}" in text and "jrouter only" in text
