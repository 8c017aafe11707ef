-- The KYC limit counts all the money an organization not verified has added, not each call:
-- splitting a top-up (or a credit purchase) in parts no longer gets past it.
--
-- money_added: top-ups and purchased credits, in the wallet currency, ever. Read only for
-- organizations not verified, which the limit keeps small; the partial index keeps the read off
-- their usage rows.
CREATE INDEX IF NOT EXISTS transactions_money_in ON transactions (organization_id)
    WHERE kind IN ('topup', 'credit_grant');

CREATE OR REPLACE FUNCTION money_added(p_org uuid) RETURNS bigint
LANGUAGE sql STABLE AS $$
SELECT coalesce(sum(t.amount), 0)::bigint FROM transactions t
WHERE t.organization_id = p_org AND t.kind IN ('topup', 'credit_grant')
  AND (t.kind = 'topup' OR EXISTS (
      SELECT 1 FROM postings p JOIN ledger_accounts a ON a.id = p.account_id
      WHERE p.transaction_id = t.id AND a.credit_source = 'purchase'))
$$;

-- Refuse (HINT 'KYC_REQUIRED:amount') adding p_amount when the organization is not verified
-- and the money it added would pass p_limit. Locks the wallet first (the lock order of every
-- transfer), so two top-ups at once are counted one after the other.
CREATE OR REPLACE FUNCTION check_kyc_room(p_org uuid, p_amount bigint, p_limit bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_currency text;
    v_added bigint;
BEGIN
    IF p_limit <= 0 OR (SELECT o.kyc_status FROM organizations o WHERE o.id = p_org)
                       IS NOT DISTINCT FROM 'verified' THEN
        RETURN;
    END IF;
    SELECT w.currency INTO v_currency FROM wallets w WHERE w.organization_id = p_org FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;  -- post_transfer says NOT_FOUND
    END IF;
    v_added := money_added(p_org);
    IF v_added + p_amount > p_limit THEN
        RAISE EXCEPTION 'an organization not KYC-verified may add at most % % in all (% added so far)',
            to_char(p_limit / 1000000.0, 'FM999999999990.000000'), v_currency,
            to_char(v_added / 1000000.0, 'FM999999999990.000000')
            USING HINT = 'KYC_REQUIRED:amount';
    END IF;
END
$$;

-- post_transfer checks the room first, then does what it did (renamed post_transfer_one).
ALTER FUNCTION post_transfer(uuid, uuid, text, bigint, text, text, uuid, text, text, text, text,
    bytea, text, text, boolean, text, text, bytea, text, bigint) RENAME TO post_transfer_one;

CREATE FUNCTION post_transfer(
    p_id uuid, p_org uuid, p_kind text, p_amount bigint, p_currency text, p_description text,
    p_project uuid, p_resource_type text, p_resource_id text, p_reference text, p_key text,
    p_fingerprint bytea, p_actor text, p_platform text, p_allow_overdraft boolean,
    p_event_id text, p_event_type text, p_event bytea, p_channel text, p_kyc_limit bigint)
RETURNS TABLE (
    transaction_id uuid, replayed boolean, created_at timestamptz, currency text,
    balance bigint, credits bigint, held_balance bigint, run_rate bigint, level text,
    warning_amount bigint, critical_amount bigint, warning_hours double precision,
    critical_hours double precision, auto_topup_below bigint,
    codes text[], amounts bigint[], befores bigint[], afters bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'topup' AND p_kyc_limit > 0 THEN
        PERFORM check_kyc_room(p_org, p_amount, p_kyc_limit);
    END IF;
    RETURN QUERY SELECT * FROM post_transfer_one(
        p_id, p_org, p_kind, p_amount, p_currency, p_description, p_project, p_resource_type,
        p_resource_id, p_reference, p_key, p_fingerprint, p_actor, p_platform,
        p_allow_overdraft, p_event_id, p_event_type, p_event, p_channel, p_kyc_limit);
END
$$;
