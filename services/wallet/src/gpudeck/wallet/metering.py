"""Per-second metering: what a running resource owes.

Rounding rule: within one rate segment (from open, or from the last rate change, at time s),
the amount charged by time t is floor(hourly_rate × µs(t − s) / 3,600,000,000) micro-units.
Each billing tick charges the difference from what that segment has already been charged, so
ticks never accumulate rounding error: a meter open for exactly N seconds at one rate is charged
floor(rate × N / 3600) in total, however many ticks (and restarts) fall in between; when the
rate is a whole number of micro-units per second (rate divisible by 3600), exactly rate × N / 3600.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.ledger import SpendLine
from gpudeck.wallet.money import MAX_AMOUNT
from gpudeck.wallet.text import check_text

RESOURCE_TYPES = ("pod", "vm", "nfs_volume", "object_storage")
MICROS_PER_HOUR = 3_600_000_000
# How long before now a meter may say it opened (`at`): a caller catching up after an outage,
# not one sending an unset time.
MAX_BACKDATE = timedelta(hours=24)


def owed(hourly_rate: int, start: datetime, end: datetime) -> int:
    """What a segment at `hourly_rate` owes from `start` to `end`, floored to the micro-unit."""
    delta = end - start
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if micros <= 0:
        return 0
    return hourly_rate * micros // MICROS_PER_HOUR


def in_transfers(lines: Sequence[SpendLine], limit: int = MAX_AMOUNT) -> list[list[SpendLine]]:
    """`lines` cut into groups that each sum to at most `limit`, the most one transfer moves
    (a line too large for one is cut in parts): what a meter owes is charged however large
    it has grown (a high rate, a long outage of billing), never refused as "too large"."""
    groups: list[list[SpendLine]] = [[]]
    room = limit
    for line in lines:
        left = line.amount
        while left > 0:
            if room == 0:
                groups.append([])
                room = limit
            part = min(left, room)
            groups[-1].append(
                line if part == line.amount else dataclasses.replace(line, amount=part)
            )
            left -= part
            room -= part
    return [g for g in groups if g]


@dataclass(frozen=True)
class Meter:
    id: str
    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    resource_id: str
    resource_type: str
    hourly_rate: int
    opened_at: datetime
    closed_at: datetime | None
    segment_started_at: datetime
    segment_charged: int
    billed_until: datetime
    total_charged: int
    currency: str = ""
    opening_rate: int | None = None  # None: opened before the wallet kept it (migration 013)

    def to_json(self) -> dict[str, Any]:
        """The meter as an answer remembered for a retry (`from_json` reads it back)."""
        return {
            k: v.isoformat()
            if isinstance(v, datetime)
            else str(v)
            if isinstance(v, uuid.UUID)
            else v
            for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Meter:
        def time(name: str) -> datetime | None:
            return datetime.fromisoformat(data[name]) if data[name] is not None else None

        read: dict[str, Any] = {
            **data,
            "organization_id": uuid.UUID(data["organization_id"]),
            "project_id": uuid.UUID(data["project_id"]) if data["project_id"] else None,
            **{
                k: time(k) for k in ("opened_at", "closed_at", "segment_started_at", "billed_until")
            },
        }
        return cls(**read)

    def differs_from(self, request: MeterRequest) -> str:
        """What an OpenMeter retry changes about the meter it opened ("" when nothing): the
        resource (organization, id, type), the project, the rate it opened with, or the time
        it opened at, when the retry's is earlier (a later one may be the first call's own: a
        time ahead of the clock was taken as the clock's)."""
        if (self.organization_id, self.resource_id, self.resource_type) != (
            request.organization_id,
            request.resource_id,
            request.resource_type,
        ):
            return "resource"
        if self.project_id != request.project_id:
            return "project_id"
        if self.opening_rate is not None and self.opening_rate != request.hourly_rate:
            return "hourly_rate"
        if request.at is not None and request.at < self.opened_at:
            return "at"
        return ""


@dataclass(frozen=True)
class MeterRequest:
    meter_id: str
    organization_id: uuid.UUID
    resource_id: str
    resource_type: str
    hourly_rate: int
    project_id: uuid.UUID | None = None
    at: datetime | None = None

    def validate(self) -> MeterRequest:
        if not self.meter_id.strip() or len(self.meter_id) > 200:
            raise InvalidArgument("meter_id is required (at most 200 characters)", field="meter_id")
        check_text(self.meter_id, "meter_id")
        check_text(self.resource_id, "resource_id")
        if self.resource_type not in RESOURCE_TYPES:
            raise InvalidArgument(
                f"resource_type must be one of {', '.join(RESOURCE_TYPES)}",
                field="resource_type",
            )
        if not self.resource_id.strip():
            raise InvalidArgument("resource_id is required", field="resource_id")
        check_rate(self.hourly_rate)
        return self


def rate_change_fingerprint(meter_id: str, hourly_rate: int, at: datetime | None) -> bytes:
    """What makes an UpdateMeterRate call the same request as another with its key."""
    payload = {
        "op": "meter.update_rate",
        "meter_id": meter_id,
        "hourly_rate": hourly_rate,
        "at": at.isoformat() if at is not None else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).digest()


def check_rate(hourly_rate: int) -> int:
    if hourly_rate < 0 or hourly_rate > MAX_AMOUNT:
        raise InvalidArgument(
            "hourly_rate must be between 0 and 1e15 micro-units", field="hourly_rate"
        )
    return hourly_rate
