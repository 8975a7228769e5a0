"""AWS replacement provider: launch one EC2 spot instance, falling back to on-demand.

:class:`AwsSpotProvider` calls ``RunInstances`` for exactly one instance, as a one-time
spot instance, trying each configured instance type in order. When AWS refuses spot
capacity for every type (``InsufficientInstanceCapacity``, ``SpotMaxPriceTooLow`` and
friends) and ``fallback_on_demand`` is set, it launches the same thing on-demand. It then
waits with the ``instance_running`` waiter and reports the private IP. boto3 blocks, so
every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError, WaiterError

from albatross.clouds.provider import LaunchedHost, Lifecycle, ProviderError

__all__ = ["CAPACITY_ERROR_CODES", "AwsSpotProvider"]

log = logging.getLogger(__name__)

# Error codes meaning "no capacity for this request right now": try the next type, then
# on-demand. Anything else is a configuration or permission problem and is raised.
CAPACITY_ERROR_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "InsufficientCapacity",
        "UnfulfillableCapacity",
    }
)

SPOT_MARKET_OPTIONS: Mapping[str, Any] = {
    "MarketType": "spot",
    "SpotOptions": {
        "SpotInstanceType": "one-time",
        "InstanceInterruptionBehavior": "terminate",
    },
}

_TAG_VALUE_MAX = 256


def _default_client_factory(region: str) -> Any:
    import boto3

    return boto3.client("ec2", region_name=region)


def _describe(err: ClientError) -> tuple[str, str]:
    error = err.response.get("Error", {})
    return str(error.get("Code", "Unknown")), str(error.get("Message", str(err)))


def _provider_error(api: str, err: ClientError) -> ProviderError:
    code, message = _describe(err)
    return ProviderError(f"ec2:{api} failed with {code}: {message}")


class AwsSpotProvider:
    """Launches replacement engine hosts on EC2 (spot first, on-demand as fallback).

    Exactly one of ``launch_template`` (a name, or an id starting with ``lt-``) and
    ``image_id`` must be given. With ``image_id``, ``instance_types`` must not be empty;
    with a launch template an empty list means "the template's instance type".
    ``client_factory(region)`` returns the EC2 client (tests pass a moto-backed one).
    """

    def __init__(
        self,
        region: str,
        *,
        launch_template: str | None = None,
        image_id: str | None = None,
        instance_types: Sequence[str],
        subnet_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        fallback_on_demand: bool = True,
        client_factory: Callable[[str], Any] = _default_client_factory,
        waiter_delay_s: float = 5.0,
        waiter_max_attempts: int = 60,
    ) -> None:
        if (launch_template is None) == (image_id is None):
            raise ValueError("give exactly one of launch_template and image_id")
        if isinstance(instance_types, str):
            raise ValueError("instance_types must be a sequence of type names, not a str")
        if image_id is not None and not instance_types:
            raise ValueError("instance_types must not be empty when launching from image_id")
        if waiter_delay_s < 0 or waiter_max_attempts < 1:
            raise ValueError("waiter_delay_s must be >= 0 and waiter_max_attempts >= 1")
        self.region = region
        self.launch_template = launch_template
        self.image_id = image_id
        self.instance_types: tuple[str, ...] = tuple(instance_types)
        self.subnet_id = subnet_id
        self.tags: dict[str, str] = dict(tags or {})
        self.fallback_on_demand = fallback_on_demand
        self.waiter_delay_s = waiter_delay_s
        self.waiter_max_attempts = waiter_max_attempts
        self._client_factory = client_factory
        self._client: Any = None
        self._client_lock = threading.Lock()

    # -- public API -------------------------------------------------------------------

    async def launch(self, reason: str) -> LaunchedHost:
        """Launch one instance (spot, else on-demand if allowed) and wait until running."""
        return await asyncio.to_thread(self._launch_sync, reason)

    async def terminate(self, host_id: str) -> None:
        """Terminate ``host_id`` (does not wait for it to reach ``terminated``)."""
        await asyncio.to_thread(self._terminate_sync, host_id)

    # -- blocking work (runs in a worker thread) --------------------------------------

    def _ec2(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._client_factory(self.region)
            return self._client

    def _base_params(self, reason: str) -> dict[str, Any]:
        tags = {**self.tags, "albatross:role": "engine", "albatross:reason": reason}
        params: dict[str, Any] = {
            "MinCount": 1,
            "MaxCount": 1,
            "TagSpecifications": [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v[:_TAG_VALUE_MAX]} for k, v in tags.items()],
                }
            ],
        }
        if self.image_id is not None:
            params["ImageId"] = self.image_id
        if self.launch_template is not None:
            key = (
                "LaunchTemplateId"
                if self.launch_template.startswith("lt-")
                else "LaunchTemplateName"
            )
            params["LaunchTemplate"] = {key: self.launch_template}
        if self.subnet_id is not None:
            params["SubnetId"] = self.subnet_id
        return params

    def _try_types(
        self, ec2: Any, base: dict[str, Any], lifecycle: Lifecycle, refused: list[str]
    ) -> tuple[dict[str, Any], Lifecycle] | None:
        """Try every instance type for one market; ``None`` if all were refused for capacity."""
        for instance_type in self.instance_types or (None,):
            params = dict(base)
            if instance_type is not None:
                params["InstanceType"] = instance_type
            if lifecycle == "spot":
                params["InstanceMarketOptions"] = SPOT_MARKET_OPTIONS
            try:
                response = ec2.run_instances(**params)
            except ClientError as err:
                code, message = _describe(err)
                if code in CAPACITY_ERROR_CODES:
                    label = instance_type or "template type"
                    refused.append(f"{lifecycle} {label}: {code}")
                    log.info("%s capacity refused for %s: %s (%s)", lifecycle, label, code, message)
                    continue
                raise _provider_error("RunInstances", err) from err
            instance: dict[str, Any] = response["Instances"][0]
            return instance, lifecycle
        return None

    def _launch_sync(self, reason: str) -> LaunchedHost:
        ec2 = self._ec2()
        base = self._base_params(reason)
        refused: list[str] = []
        launched = self._try_types(ec2, base, "spot", refused)
        if launched is None and self.fallback_on_demand:
            log.warning("spot capacity refused for every type; falling back to on-demand")
            launched = self._try_types(ec2, base, "on-demand", refused)
        if launched is None:
            raise ProviderError(
                "ec2:RunInstances: no capacity for any instance type ("
                + "; ".join(refused)
                + ")"
                + ("" if self.fallback_on_demand else "; on-demand fallback is disabled")
            )
        instance, lifecycle = launched
        instance_id = str(instance["InstanceId"])
        try:
            described = self._wait_running(ec2, instance_id)
        except ProviderError:
            self._best_effort_terminate(ec2, instance_id)
            raise
        address = described.get("PrivateIpAddress") or instance.get("PrivateIpAddress")
        instance_type = described.get("InstanceType") or instance.get("InstanceType") or ""
        return LaunchedHost(
            host_id=instance_id,
            address=str(address) if address else None,
            lifecycle=lifecycle,
            instance_type=str(instance_type),
        )

    def _wait_running(self, ec2: Any, instance_id: str) -> dict[str, Any]:
        try:
            ec2.get_waiter("instance_running").wait(
                InstanceIds=[instance_id],
                WaiterConfig={
                    "Delay": self.waiter_delay_s,
                    "MaxAttempts": self.waiter_max_attempts,
                },
            )
        except WaiterError as err:
            raise ProviderError(
                f"ec2:DescribeInstances (instance_running waiter) gave up on {instance_id}: {err}"
            ) from err
        except ClientError as err:
            raise _provider_error("DescribeInstances", err) from err
        try:
            response = ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as err:
            raise _provider_error("DescribeInstances", err) from err
        for reservation in response.get("Reservations", []):
            for found in reservation.get("Instances", []):
                if found.get("InstanceId") == instance_id:
                    return dict(found)
        return {}

    def _best_effort_terminate(self, ec2: Any, instance_id: str) -> None:
        try:
            ec2.terminate_instances(InstanceIds=[instance_id])
        except ClientError:
            log.exception("could not terminate %s after a failed launch", instance_id)

    def _terminate_sync(self, host_id: str) -> None:
        try:
            self._ec2().terminate_instances(InstanceIds=[host_id])
        except ClientError as err:
            raise _provider_error("TerminateInstances", err) from err
