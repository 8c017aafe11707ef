-- The refunds that name a charge (`reference`: its transaction id), found without reading the
-- organization's whole ledger: a refund's resource is given back at most what its charge has
-- left after those (refunds_store.attribute_refunds).
CREATE INDEX IF NOT EXISTS transactions_refunds_by_reference
    ON transactions (organization_id, reference) WHERE kind = 'refund' AND reference <> '';
