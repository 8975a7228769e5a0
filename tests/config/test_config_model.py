"""The config model's rules for agents and replacement hosts: each broken rule names its
key and value (the CLI prints these lines and exits 2)."""

from __future__ import annotations

from typing import Any

import pytest

from albatross.config import ConfigError, config_from_mapping

MODEL = {"name": "m", "replicas": 0}


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"models": [MODEL], **data}, "t.toml")
    return err.value.problems


def test_a_model_served_only_by_agents_is_valid() -> None:
    cfg = config_from_mapping({"models": [MODEL]})
    assert cfg.models[0].replicas == 0 and cfg.models[0].endpoints == ()


def test_agent_defaults() -> None:
    a = config_from_mapping({"models": [MODEL]}).agent
    assert a.gateway_url is None and a.advertise_host == "127.0.0.1" and a.heartbeat_s == 5.0


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("agent", "gateway_url", "https://gw:8000", ["agent.gateway_url", "https://gw:8000"]),
        ("agent", "heartbeat_s", 0, ["agent.heartbeat_s", "0", "greater than 0"]),
        ("agent", "drain_on_stop_s", -1, ["agent.drain_on_stop_s", "-1"]),
        ("agent", "bogus", 1, ["agent.bogus", "unknown key"]),
    ],
)
def test_agent_rules(section: str, key: str, value: Any, words: list[str]) -> None:
    text = "\n".join(_problems({section: {key: value}}))
    for w in words:
        assert w in text, (w, text)


def test_gateway_url_loses_its_trailing_slash() -> None:
    cfg = config_from_mapping({"models": [MODEL], "agent": {"gateway_url": "http://gw:8000/"}})
    assert cfg.agent.gateway_url == "http://gw:8000"


@pytest.mark.parametrize(
    ("aws", "words"),
    [
        ({"region": "us-east-1"}, ["spot.aws", "exactly one of launch_template and image_id"]),
        (
            {"region": "us-east-1", "image_id": "ami-1", "launch_template": "lt-1"},
            ["exactly one"],
        ),
        ({"region": "us-east-1", "image_id": "ami-1"}, ["instance_types must not be empty"]),
        ({"image_id": "ami-1", "instance_types": ["c7i.large"]}, ["spot.aws.region", "required"]),
    ],
)
def test_aws_replacement_rules(aws: dict[str, Any], words: list[str]) -> None:
    text = "\n".join(_problems({"spot": {"aws": aws}}))
    for w in words:
        assert w in text, (w, text)


def test_aws_replacement_from_a_launch_template() -> None:
    cfg = config_from_mapping(
        {
            "models": [MODEL],
            "spot": {
                "aws": {"region": "eu-west-1", "launch_template": "engines", "tags": {"a": "b"}}
            },
        }
    )
    assert cfg.spot.aws is not None
    assert cfg.spot.aws.instance_types == () and cfg.spot.aws.tags == {"a": "b"}


def test_the_example_file_lists_every_key_with_its_default() -> None:
    import re
    from pathlib import Path

    from pydantic import BaseModel

    from albatross.config import Config, embedded_default, load_config

    example = Path(__file__).parents[2] / "examples" / "albatross.toml"
    assert load_config(example).model_dump() == embedded_default().model_dump()
    text = example.read_text()
    sections = {n: f.annotation for n, f in Config.model_fields.items() if n != "models"}
    for name, cls in sections.items():
        assert isinstance(cls, type) and issubclass(cls, BaseModel)
        for key in cls.model_fields:
            listed = re.search(rf"^#? ?({key} = |\[{name}\.{key}\])", text, re.M)
            assert listed, f"{name}.{key} missing from {example}"


def _two(eviction: dict[str, str] | None = None, **model: Any) -> dict[str, Any]:
    a = {"name": "a", "replicas": 1, **model}
    if eviction is not None:
        a["eviction"] = eviction
    return {"switch": {"gpu_budget_gib": {"0": 1.0}}, "models": [a, {"name": "b", "replicas": 1}]}


def test_switching_is_off_by_default_and_on_with_a_budget() -> None:
    from albatross.config import switch_settings

    assert not config_from_mapping({"models": [MODEL]}).switch.active
    cfg = config_from_mapping(_two({"weights": "discard", "process": "keep_running"}))
    settings = switch_settings(cfg)
    assert [str(m.eviction) for m in settings.models] == [
        "weights=discard, process=keep_running",
        "weights=discard, process=stop",
    ]


def test_a_vllm_model_is_served_without_switching() -> None:
    cfg = config_from_mapping({"models": [{"name": "v", "replicas": 2, "engine": "vllm"}]})
    assert not cfg.switch.active
    assert [(m.engine, m.replicas) for m in cfg.models] == [("vllm", 2)]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            _two({"weights": "retain", "process": "stop"}),
            ["models.0.eviction", "'a'", "retain", "not a possible combination"],
        ),
        (
            _two({"weights": "offload", "process": "keep_running"}),
            ["models.0.eviction", "not something llama-server can do", "discard+stop"],
        ),
        (
            _two({"weights": "offload", "process": "cuda_suspend"}, engine="llama-server"),
            ["cuda-checkpoint", "switch.cuda_checkpoint_command = 'cuda-checkpoint'"],
        ),
        (_two(footprint_gib=2.0), ["models['a'].footprint_gib = 2.0", "must fit the budget"]),
        (_two(gpu="1"), ["models['a'].gpu = '1'", "no memory budget"]),
        (_two(replicas=2), ["models.0", "replicas = 2", "exactly one managed engine"]),
        (
            {**_two(), "switch": {"gpu_budget_gib": {"0": 1.0}, "max_wait_s": 90.0}},
            ["max_wait_s (90.0) <= queue_timeout_s (60.0) must hold"],
        ),
    ],
)
def test_switch_rules_name_key_value_and_rule(data: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_mapping(data, "t.toml")
    text = "\n".join(err.value.problems)
    for w in words:
        assert w in text, (w, text)
