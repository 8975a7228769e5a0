"""The ``netmove`` section: off by default, and complete when on."""

from __future__ import annotations

from typing import Any

import pytest

from albatross.config import ConfigError, config_from_mapping

ON: dict[str, Any] = {"enabled": True, "gateway_id": "gw-a", "vip": "10.0.100.1"}


def problems(netmove: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"netmove": netmove})
    return info.value.problems


def test_off_by_default_and_valid_when_complete() -> None:
    assert not config_from_mapping({}).netmove.enabled
    cfg = config_from_mapping({"netmove": {**ON, "peers": {"gw-b": "10.0.2.2:7070"}}})
    assert cfg.netmove.peers == {"gw-b": "10.0.2.2:7070"}


@pytest.mark.parametrize(
    ("netmove", "says"),
    [
        ({"enabled": True}, "gateway_id and vip must be set when enabled"),
        ({**ON, "route_netns": "router"}, "route_netns and route_via go together"),
        ({**ON, "peers": {"gw-a": "10.0.2.2:7070"}}, "must not name this gateway"),
        ({"peers": {"gw-b": "10.0.2.2"}}, "'10.0.2.2' must be host:port"),
        ({"peers": {"gw-b": "10.0.2.2:99999"}}, "must be host:port"),
        ({"drain_timeout_s": 0}, "greater than 0"),
    ],
)
def test_an_incomplete_section_names_the_rule(netmove: dict[str, Any], says: str) -> None:
    lines = problems(netmove)
    assert len(lines) == 1 and lines[0].startswith("netmove") and says in lines[0], lines
