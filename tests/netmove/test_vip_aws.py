"""AwsVip against moto's in-process EC2: the secondary private IP moves between ENIs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from albatross.netmove.errors import VipError
from albatross.netmove.vip import AwsVip

REGION = "us-east-1"
VIP = "10.1.0.100"


@pytest.fixture
def ec2() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


@pytest.fixture
def enis(ec2: Any) -> tuple[str, str]:
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.0.0/24")["Subnet"]["SubnetId"]
    a = ec2.create_network_interface(SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
    b = ec2.create_network_interface(SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
    return a, b


def secondary_ips(ec2: Any, eni: str) -> set[str]:
    iface = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    return {p["PrivateIpAddress"] for p in iface["PrivateIpAddresses"] if not p["Primary"]}


def test_release_then_claim_moves_the_address(ec2: Any, enis: tuple[str, str]) -> None:
    a, b = enis
    vip = AwsVip(VIP, REGION, client_factory=lambda region: ec2)
    vip.claim(a)
    assert vip.holder([a, b]) == a
    vip.release(a)
    vip.claim(b)
    assert vip.holder([a, b]) == b
    assert VIP in secondary_ips(ec2, b) and VIP not in secondary_ips(ec2, a)


class Recording:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(**params: Any) -> Any:
            self.calls.append((name, params))
            return getattr(self.inner, name)(**params)

        return call


def test_claim_takes_the_address_even_from_a_dead_source(ec2: Any, enis: tuple[str, str]) -> None:
    # A preempted source cannot release: the claim must ask EC2 to reassign.
    # (moto does not model the reassignment itself, so the request is what is checked.)
    _, b = enis
    client = Recording(ec2)
    AwsVip(VIP, REGION, client_factory=lambda region: client).claim(b)
    assert client.calls == [
        (
            "assign_private_ip_addresses",
            {"NetworkInterfaceId": b, "PrivateIpAddresses": [VIP], "AllowReassignment": True},
        )
    ]


def test_release_is_idempotent(ec2: Any, enis: tuple[str, str]) -> None:
    a, b = enis
    vip = AwsVip(VIP, REGION, client_factory=lambda region: ec2)
    vip.claim(a)
    vip.release(b)  # not there: nothing to do
    assert vip.holder([a, b]) == a
    vip.release(a)
    vip.release(a)
    assert vip.holder([a, b]) is None


def test_cloud_errors_name_the_action_and_code(ec2: Any, enis: tuple[str, str]) -> None:
    vip = AwsVip(VIP, REGION, client_factory=lambda region: ec2)
    with pytest.raises(
        VipError,
        match=r"EC2 assign_private_ip_addresses for 10\.1\.0\.100: InvalidNetworkInterfaceID",
    ):
        vip.claim("eni-00000000")


def test_bad_address_is_refused() -> None:
    with pytest.raises(VipError, match="address: 'nope' is not an IP address"):
        AwsVip("nope", REGION, client_factory=lambda region: None)
