-- An organization's accounts by organization and kind: post_transfer finds the cash account
-- this way, and lock_wallets joins them. Without it each of those read every account of every
-- organization (and, where autovacuum is off or late, every dead version of them too).
CREATE INDEX IF NOT EXISTS ledger_accounts_organization
    ON ledger_accounts (organization_id, kind) WHERE organization_id IS NOT NULL;
