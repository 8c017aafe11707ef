-- One idempotency key, one request, whatever the call: a transfer's key is kept on its
-- transaction, while holds, captures, voids, plan changes and credit purchases keep theirs in
-- the idempotency table (scope: the organization id). A transfer whose key the organization
-- used for one of those with another payload is refused (ABORTED), as is the other way round
-- (gpudeck.wallet.idempotency.recall_in_wallet). Each side looks under the wallet's lock, so of two calls
-- at once with one key the second sees the first.
--
-- post_transfer (016's wrapper, replaced): lock the wallet, refuse a key taken, check the KYC
-- room, then post (post_transfer_one).
CREATE OR REPLACE FUNCTION post_transfer(
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
    IF p_fingerprint IS NOT NULL THEN
        PERFORM 1 FROM wallets w WHERE w.organization_id = p_org FOR UPDATE;
        IF EXISTS (SELECT 1 FROM idempotency i WHERE i.scope = p_org::text AND i.key = p_key
                   AND i.fingerprint <> p_fingerprint) THEN
            RAISE EXCEPTION 'idempotency_key % was already used with a different request',
                quote_literal(p_key) USING HINT = 'ABORTED:idempotency_key';
        END IF;
    END IF;
    IF p_kind = 'topup' AND p_kyc_limit > 0 THEN
        PERFORM check_kyc_room(p_org, p_amount, p_kyc_limit);
    END IF;
    RETURN QUERY SELECT * FROM post_transfer_one(
        p_id, p_org, p_kind, p_amount, p_currency, p_description, p_project, p_resource_type,
        p_resource_id, p_reference, p_key, p_fingerprint, p_actor, p_platform,
        p_allow_overdraft, p_event_id, p_event_type, p_event, p_channel, p_kyc_limit);
END
$$;

-- post_transfer_batch: lock the wallets, then leave to the general path (which runs next, under
-- the same locks) what it alone decides: an item whose key is taken, which it refuses per item,
-- and with p_kyc_limited a top-up of an organization not KYC-verified, whose limit counts all
-- the money it ever added (016) in its own currency. The batch body (007's, renamed) defers an
-- item that names a currency not its wallet's, with the organization's later items, so such an
-- item is marked with a currency no wallet has; the body's own KYC check is off.
ALTER FUNCTION post_transfer_batch(uuid[], int[], uuid[], text[], bigint[], text[], text[],
    uuid[], text[], text[], text[], text[], bytea[], text[], text[], text[], bytea[], text,
    bigint) RENAME TO post_transfer_batch_items;

CREATE FUNCTION post_transfer_batch(
    p_ids uuid[], p_idx int[], p_orgs uuid[], p_kinds text[], p_amounts bigint[],
    p_currencies text[], p_descriptions text[], p_projects uuid[], p_resource_types text[],
    p_resource_ids text[], p_references text[], p_keys text[], p_fingerprints bytea[],
    p_actors text[], p_event_ids text[], p_event_types text[], p_events bytea[],
    p_channel text, p_kyc_limited boolean)
RETURNS TABLE (
    created_at timestamptz, statuses text[], found_ids uuid[], afters bigint[],
    cash_befores bigint[], platform_befores bigint[], platform_slots int[], platform_codes text[],
    cash_codes text[], currencies text[], balances bigint[], run_rates bigint[],
    levels text[], warning_amounts bigint[], critical_amounts bigint[],
    warning_hours double precision[], critical_hours double precision[],
    auto_topup_below bigint[])
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_general int[];
    v_unverified uuid[];
    v_currencies text[] := p_currencies;
    i int;
BEGIN
    PERFORM 1 FROM wallets w WHERE w.organization_id = ANY(p_orgs)
    ORDER BY w.organization_id FOR UPDATE;
    IF p_kyc_limited AND 'topup' = ANY(p_kinds) THEN
        SELECT array_agg(o.id) INTO v_unverified FROM organizations o
        WHERE o.id = ANY(p_orgs) AND o.kyc_status <> 'verified';
    END IF;
    -- Under OR the EXISTS stays a probe of the key's index per item (as a join it could be
    -- planned as a scan of the whole table, which holds every account call's answers too).
    SELECT array_agg(x.i) INTO v_general
    FROM unnest(p_idx, p_kinds, p_keys, p_fingerprints) WITH ORDINALITY AS x (k, kind, key, fp, i)
    WHERE (x.kind = 'topup' AND p_orgs[x.k] = ANY(v_unverified))
       OR EXISTS (
        SELECT 1 FROM idempotency t
        WHERE t.scope = p_orgs[x.k]::text AND t.key = x.key AND t.fingerprint <> x.fp);
    FOREACH i IN ARRAY coalesce(v_general, '{}') LOOP
        v_currencies[i] := '(general path)';
    END LOOP;
    RETURN QUERY SELECT * FROM post_transfer_batch_items(
        p_ids, p_idx, p_orgs, p_kinds, p_amounts, v_currencies, p_descriptions, p_projects,
        p_resource_types, p_resource_ids, p_references, p_keys, p_fingerprints, p_actors,
        p_event_ids, p_event_types, p_events, p_channel, 0);
END
$$;
