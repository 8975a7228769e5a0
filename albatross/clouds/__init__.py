"""Preemption-notice watchers per cloud behind one interface, and the loop that polls them.

``AwsWatcher`` (IMDSv2 spot instance action and rebalance recommendation),
``GcpWatcher`` (``instance/preempted``, optionally long-polled), ``AzureWatcher``
(Scheduled Events, with acknowledgement) and ``LocalWatcher`` (in-process triggers) all
implement :class:`NoticeWatcher`; :func:`watch` polls one forever and delivers each
distinct :class:`PreemptionNotice` once.
"""

from albatross.clouds.aws import AwsWatcher
from albatross.clouds.azure import AzureWatcher
from albatross.clouds.base import (
    DEFAULT_LEAD_S,
    NoticeKind,
    NoticeSourceError,
    NoticeWatcher,
    PreemptionNotice,
)
from albatross.clouds.gcp import GcpWatcher
from albatross.clouds.local import LocalWatcher
from albatross.clouds.watch import AWS_POLL_INTERVAL_S, watch

__all__ = [
    "AWS_POLL_INTERVAL_S",
    "DEFAULT_LEAD_S",
    "AwsWatcher",
    "AzureWatcher",
    "GcpWatcher",
    "LocalWatcher",
    "NoticeKind",
    "NoticeSourceError",
    "NoticeWatcher",
    "PreemptionNotice",
    "watch",
]
