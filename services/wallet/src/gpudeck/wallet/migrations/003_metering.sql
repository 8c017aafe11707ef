-- Per-second metering of running resources, and per-call usage events.

CREATE TABLE meters (
    id                  text PRIMARY KEY,
    organization_id     uuid NOT NULL,
    project_id          uuid,
    resource_id         text NOT NULL,
    resource_type       text NOT NULL,
    hourly_rate         bigint NOT NULL CHECK (hourly_rate >= 0),
    opened_at           timestamptz NOT NULL,
    closed_at           timestamptz,
    -- The current rate segment: charged = floor(rate × seconds since segment_started_at / 3600).
    segment_started_at  timestamptz NOT NULL,
    segment_charged     bigint NOT NULL DEFAULT 0,
    billed_until        timestamptz NOT NULL,
    total_charged       bigint NOT NULL DEFAULT 0
);
CREATE INDEX meters_open ON meters (organization_id) WHERE closed_at IS NULL;

CREATE TABLE usage_events (
    event_id         text PRIMARY KEY,
    organization_id  uuid NOT NULL,
    project_id       uuid,
    meter            text NOT NULL,
    quantity         double precision NOT NULL,
    unit_price       bigint NOT NULL,
    cost             bigint NOT NULL,
    dimensions       jsonb NOT NULL DEFAULT '{}',
    success          boolean NOT NULL DEFAULT true,
    latency_ms       integer NOT NULL DEFAULT 0,
    at               timestamptz NOT NULL,
    transaction_id   uuid
);
CREATE INDEX usage_events_recent ON usage_events (organization_id, at DESC);

-- Hourly rollup of usage events by their dimensions.
CREATE TABLE usage_hourly (
    organization_id  uuid NOT NULL,
    hour             timestamptz NOT NULL,
    meter            text NOT NULL,
    model            text NOT NULL DEFAULT '',
    provider         text NOT NULL DEFAULT '',
    region           text NOT NULL DEFAULT '',
    api              text NOT NULL DEFAULT '',
    calls            bigint NOT NULL DEFAULT 0,
    errors           bigint NOT NULL DEFAULT 0,
    quantity         double precision NOT NULL DEFAULT 0,
    cost             bigint NOT NULL DEFAULT 0,
    latency_ms_sum   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, hour, meter, model, provider, region, api)
);
