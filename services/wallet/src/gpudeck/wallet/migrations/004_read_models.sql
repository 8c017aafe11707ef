-- Rollups the dashboards read, kept in the same transaction as the ledger entries they sum.

CREATE TABLE daily_spend (
    organization_id  uuid NOT NULL,
    day              date NOT NULL,
    resource_type    text NOT NULL,
    amount           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, resource_type)
);

CREATE TABLE resource_costs (
    organization_id   uuid NOT NULL,
    resource_id       text NOT NULL,
    resource_type     text NOT NULL,
    project_id        uuid,
    total             bigint NOT NULL DEFAULT 0,
    first_charged_at  timestamptz NOT NULL,
    last_charged_at   timestamptz NOT NULL,
    PRIMARY KEY (organization_id, resource_id)
);

-- 1 base = rate quote, with history; the newest as_of wins.
CREATE TABLE exchange_rates (
    id      bigserial PRIMARY KEY,
    base    text NOT NULL,
    quote   text NOT NULL,
    rate    numeric(24, 12) NOT NULL CHECK (rate > 0),
    as_of   timestamptz NOT NULL,
    source  text NOT NULL DEFAULT 'admin'
);
CREATE INDEX exchange_rates_latest ON exchange_rates (base, quote, as_of DESC, id DESC);

CREATE TABLE thresholds (
    organization_id  uuid PRIMARY KEY,
    warning_amount   bigint NOT NULL DEFAULT 0,
    critical_amount  bigint NOT NULL DEFAULT 0,
    warning_hours    double precision NOT NULL DEFAULT 0,
    critical_hours   double precision NOT NULL DEFAULT 0
);

CREATE TABLE auto_topups (
    organization_id  uuid PRIMARY KEY,
    enabled          boolean NOT NULL DEFAULT false,
    below            bigint NOT NULL DEFAULT 0,
    amount           bigint NOT NULL DEFAULT 0
);

CREATE TABLE pending_topups (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL,
    amount           bigint NOT NULL,
    currency         text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'completed', 'failed')),
    transaction_id   uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz
);
-- At most one pending automatic top-up per organization.
CREATE UNIQUE INDEX pending_topups_one ON pending_topups (organization_id)
    WHERE status = 'pending';

CREATE TABLE preferences (
    organization_id            uuid NOT NULL,
    user_id                    uuid NOT NULL,
    display_currency           text NOT NULL DEFAULT '',
    theme                      text NOT NULL DEFAULT 'system',
    compact_mode               boolean NOT NULL DEFAULT false,
    email_notifications        boolean NOT NULL DEFAULT true,
    low_balance_notifications  boolean NOT NULL DEFAULT true,
    PRIMARY KEY (organization_id, user_id)
);

CREATE TABLE plans (
    code              text PRIMARY KEY,
    name              text NOT NULL,
    monthly_fee_usd   bigint NOT NULL,
    monthly_fee_inr   bigint NOT NULL,
    credits_usd       bigint NOT NULL,
    credits_inr       bigint NOT NULL,
    position          integer NOT NULL
);
INSERT INTO plans VALUES
    ('standard',   'Standard',   0,            0,              0,            0,              1),
    ('premium',    'Premium',    49000000,     4000000000,     60000000,     5000000000,     2),
    ('enterprise', 'Enterprise', 499000000,    40000000000,    650000000,    54000000000,    3);

CREATE TABLE invoices (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL,
    period           text NOT NULL,  -- YYYY-MM
    currency         text NOT NULL,
    total            bigint NOT NULL,
    lines            jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid')),
    issued_at        timestamptz NOT NULL DEFAULT now(),
    paid_at          timestamptz,
    UNIQUE (organization_id, period)
);
