-- The ledger: accounts with balances, immutable transactions and postings, holds, idempotency.
-- Money is bigint micro-units (1e-6 of the currency).

-- One row per organization: the wallet's totals, kept in step with its ledger accounts.
CREATE TABLE wallets (
    organization_id  uuid PRIMARY KEY REFERENCES organizations (id),
    currency         text NOT NULL CHECK (currency IN ('INR', 'USD')),
    cash_account_id  bigint NOT NULL,
    balance          bigint NOT NULL DEFAULT 0,  -- cash + unexpired credits
    credits          bigint NOT NULL DEFAULT 0,  -- the credit part of balance
    held_balance     bigint NOT NULL DEFAULT 0,  -- open holds
    run_rate         bigint NOT NULL DEFAULT 0,  -- open meters' hourly rates, summed
    level            text NOT NULL DEFAULT 'ok'
                     CHECK (level IN ('ok', 'warning', 'critical', 'depleted')),
    changed_at       timestamptz NOT NULL DEFAULT now(),  -- balance, held or run rate moved
    announced_at     timestamptz NOT NULL DEFAULT '-infinity',  -- last wallet.balance.changed
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wallets_unannounced ON wallets (changed_at) WHERE changed_at > announced_at;

-- Organization accounts (cash; one per credit grant) and platform accounts (sharded).
CREATE TABLE ledger_accounts (
    id               bigserial PRIMARY KEY,
    code             text NOT NULL UNIQUE,
    organization_id  uuid,
    kind             text NOT NULL CHECK (kind IN ('cash', 'credit', 'platform')),
    currency         text NOT NULL,
    balance          bigint NOT NULL DEFAULT 0,
    expires_at       timestamptz,
    credit_source    text,
    platform_pool    text,  -- platform accounts: '<name>:<currency>', the pool of shards it is in
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_accounts_pool ON ledger_accounts (platform_pool) WHERE kind = 'platform';
CREATE INDEX ledger_accounts_credits ON ledger_accounts (organization_id, expires_at)
    WHERE kind = 'credit';

CREATE TABLE transactions (
    id                uuid PRIMARY KEY,
    organization_id   uuid NOT NULL,
    kind              text NOT NULL,
    amount            bigint NOT NULL,
    currency          text NOT NULL,
    payment_amount    bigint,
    payment_currency  text,
    exchange_rate     text,
    description       text NOT NULL DEFAULT '',
    project_id        uuid,
    resource_type     text NOT NULL DEFAULT '',
    resource_id       text NOT NULL DEFAULT '',
    reference         text NOT NULL DEFAULT '',
    idempotency_key   text NOT NULL,
    fingerprint       bytea,  -- of the request, for idempotent retries; NULL for internal ones
    actor             text NOT NULL DEFAULT '',
    balance_after     bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
-- Also the idempotency record of transfers: a retry finds its first transaction here.
CREATE UNIQUE INDEX transactions_key ON transactions (organization_id, idempotency_key);
CREATE INDEX transactions_organization ON transactions (organization_id, id DESC);

-- Immutable entries; per transaction they sum to zero (one currency per transaction).
CREATE TABLE postings (
    id              bigserial PRIMARY KEY,
    transaction_id  uuid NOT NULL,
    account_id      bigint NOT NULL,
    amount          bigint NOT NULL,
    balance_before  bigint NOT NULL,
    balance_after   bigint NOT NULL,
    CHECK (balance_after = balance_before + amount)
);
CREATE INDEX postings_transaction ON postings (transaction_id);

-- Funds reserved for pending operations; each resolves exactly once.
CREATE TABLE holds (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    status           text NOT NULL DEFAULT 'open'
                     CHECK (status IN ('open', 'captured', 'voided', 'expired')),
    captured         bigint NOT NULL DEFAULT 0,
    description      text NOT NULL DEFAULT '',
    project_id       uuid,
    resource_type    text NOT NULL DEFAULT '',
    resource_id      text NOT NULL DEFAULT '',
    transaction_id   uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    resolved_at      timestamptz
);
CREATE INDEX holds_open ON holds (expires_at) WHERE status = 'open';
CREATE INDEX holds_organization ON holds (organization_id) WHERE status = 'open';

-- What a mutating call other than a transfer answered, by its key: retries get the same answer.
CREATE TABLE idempotency (
    scope        text NOT NULL,
    key          text NOT NULL,
    fingerprint  bytea NOT NULL,
    result       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Platform accounts: funding (money in), revenue (charges), adjustments, credits_issued,
-- credits_expired; per currency, a pool of 16 shards. A transaction takes whichever shard of its
-- pool no other transaction holds (FOR UPDATE SKIP LOCKED), so concurrent transfers never wait
-- on the platform's side; the platform's balance is the sum of its pool.
INSERT INTO ledger_accounts (code, kind, currency, platform_pool)
SELECT format('platform:%s:%s:%s', name, currency, lpad(shard::text, 2, '0')), 'platform', currency,
       name || ':' || currency
FROM unnest(ARRAY['funding', 'revenue', 'adjustments', 'credits_issued', 'credits_expired']) AS name,
     unnest(ARRAY['INR', 'USD']) AS currency,
     generate_series(0, 15) AS shard;
