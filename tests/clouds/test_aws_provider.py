"""AwsSpotProvider against moto's in-process EC2."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from albatross.clouds.aws_provider import AwsSpotProvider
from albatross.clouds.provider import LaunchedHost, ProviderError, ReplacementProvider

REGION = "us-east-1"
MOTO_AMI = "ami-12c6146b"


class RecordingClient:
    """Wraps a real (moto) EC2 client: records run_instances calls and can refuse spot."""

    def __init__(self, inner: Any, *, refuse_spot: str | None = None, fail_all: str | None = None):
        self.inner = inner
        self.refuse_spot = refuse_spot
        self.fail_all = fail_all
        self.run_calls: list[dict[str, Any]] = []
        self.terminated: list[list[str]] = []

    def run_instances(self, **params: Any) -> Any:
        self.run_calls.append(params)
        code = self.fail_all
        if code is None and "InstanceMarketOptions" in params:
            code = self.refuse_spot
        if code is not None:
            raise ClientError(
                {"Error": {"Code": code, "Message": f"forced {code}"}}, "RunInstances"
            )
        return self.inner.run_instances(**params)

    def terminate_instances(self, **params: Any) -> Any:
        self.terminated.append(list(params["InstanceIds"]))
        return self.inner.terminate_instances(**params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


@pytest.fixture
def ami(ec2: Any) -> str:
    # One of moto's built-in AMIs; looking it up by id is cheap (listing them all is not).
    [image] = ec2.describe_images(ImageIds=[MOTO_AMI])["Images"]
    return str(image["ImageId"])


def provider(client: Any, **kwargs: Any) -> AwsSpotProvider:
    kwargs.setdefault("instance_types", ["m5.large", "m5.xlarge"])
    return AwsSpotProvider(
        REGION,
        client_factory=lambda region: client,
        waiter_delay_s=0.01,
        waiter_max_attempts=5,
        **kwargs,
    )


def describe(ec2: Any, instance_id: str) -> dict[str, Any]:
    instance: dict[str, Any] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"
    ][0]
    return instance


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


async def test_launches_one_tagged_running_spot_instance(ec2: Any, ami: str) -> None:
    client = RecordingClient(ec2)
    prov = provider(client, image_id=ami, tags={"team": "infra"})
    assert isinstance(prov, ReplacementProvider)

    host = await prov.launch("preempted i-0old")

    assert isinstance(host, LaunchedHost)
    assert host.lifecycle == "spot"
    assert host.instance_type == "m5.large"
    assert host.address
    instance = describe(ec2, host.host_id)
    assert instance["State"]["Name"] == "running"
    assert instance["InstanceLifecycle"] == "spot"
    assert instance["PrivateIpAddress"] == host.address
    assert tags_of(instance) == {
        "team": "infra",
        "albatross:role": "engine",
        "albatross:reason": "preempted i-0old",
    }
    [call] = client.run_calls
    assert call["MinCount"] == call["MaxCount"] == 1
    assert call["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        },
    }
    reservations = ec2.describe_instances()["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 1


async def test_spot_refused_for_every_type_falls_back_to_on_demand(ec2: Any, ami: str) -> None:
    client = RecordingClient(ec2, refuse_spot="InsufficientInstanceCapacity")
    host = await provider(client, image_id=ami).launch("rebalance")

    assert host.lifecycle == "on-demand"
    assert host.instance_type == "m5.large"
    spot_calls = [c for c in client.run_calls if "InstanceMarketOptions" in c]
    od_calls = [c for c in client.run_calls if "InstanceMarketOptions" not in c]
    assert [c["InstanceType"] for c in spot_calls] == ["m5.large", "m5.xlarge"]
    assert [c["InstanceType"] for c in od_calls] == ["m5.large"]
    instance = describe(ec2, host.host_id)
    assert instance["State"]["Name"] == "running"
    assert "InstanceLifecycle" not in instance
    assert tags_of(instance)["albatross:reason"] == "rebalance"


async def test_fallback_disabled_raises_with_the_code(ec2: Any, ami: str) -> None:
    client = RecordingClient(ec2, refuse_spot="SpotMaxPriceTooLow")
    prov = provider(client, image_id=ami, fallback_on_demand=False)
    with pytest.raises(ProviderError, match="SpotMaxPriceTooLow"):
        await prov.launch("preempted")
    assert all("InstanceMarketOptions" in c for c in client.run_calls)
    assert ec2.describe_instances()["Reservations"] == []


async def test_other_errors_are_raised_at_once_and_chained(ec2: Any, ami: str) -> None:
    client = RecordingClient(ec2, fail_all="UnauthorizedOperation")
    with pytest.raises(ProviderError) as info:
        await provider(client, image_id=ami).launch("preempted")
    message = str(info.value)
    assert "RunInstances" in message
    assert "UnauthorizedOperation" in message
    assert "forced UnauthorizedOperation" in message
    assert isinstance(info.value.__cause__, ClientError)
    assert len(client.run_calls) == 1


async def test_launch_template(ec2: Any, ami: str) -> None:
    ec2.create_launch_template(
        LaunchTemplateName="albatross-engine",
        LaunchTemplateData={"ImageId": ami, "InstanceType": "c5.large"},
    )
    client = RecordingClient(ec2)
    prov = provider(client, launch_template="albatross-engine", instance_types=[])
    host = await prov.launch("preempted")

    assert host.lifecycle == "spot"
    assert host.instance_type == "c5.large"
    [call] = client.run_calls
    assert call["LaunchTemplate"] == {"LaunchTemplateName": "albatross-engine"}
    assert "ImageId" not in call and "InstanceType" not in call
    assert describe(ec2, host.host_id)["State"]["Name"] == "running"


async def test_terminate(ec2: Any, ami: str) -> None:
    client = RecordingClient(ec2)
    prov = provider(client, image_id=ami)
    host = await prov.launch("preempted")
    await prov.terminate(host.host_id)
    assert client.terminated == [[host.host_id]]
    assert describe(ec2, host.host_id)["State"]["Name"] in {"shutting-down", "terminated"}


async def test_terminate_unknown_instance_raises(ec2: Any, ami: str) -> None:
    with pytest.raises(ProviderError, match="TerminateInstances"):
        await provider(ec2, image_id=ami).terminate("i-0123456789abcdef0")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"launch_template": "lt-0123", "image_id": "ami-0123"},
        {},
        {"image_id": "ami-0123", "instance_types": []},
    ],
)
def test_invalid_configuration_raises_value_error(kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("instance_types", ["m5.large"])
    with pytest.raises(ValueError):
        AwsSpotProvider(REGION, **kwargs)
