-- The balance announcer settles the open invoices of the wallets it announces (a top-up that
-- ends an overdraft pays them at once): this keeps that lookup to the few open ones.
CREATE INDEX IF NOT EXISTS invoices_open ON invoices (organization_id) WHERE status = 'open';
