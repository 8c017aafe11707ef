"""What the wallet service serves and runs; the domain APIs grow in their own modules."""

from __future__ import annotations

from pathlib import Path

from gpudeck.kit.runtime import ServiceContext, ServiceParts, ServiceSpec
from gpudeck.wallet import demo


async def build(ctx: ServiceContext) -> ServiceParts:
    token = ctx.env.get("GPUDECK_BOOTSTRAP_TOKEN", "").strip() or None
    if ctx.env.get("GPUDECK_DEMO", "") in ("1", "true", "yes") or token:
        await demo.seed(ctx.pool, bootstrap_token=token)
    return ServiceParts()


SPEC = ServiceSpec(name="wallet", migrations=Path(__file__).parent / "migrations", build=build)
