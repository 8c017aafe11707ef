-- post_transfer_batch (017's wrapper, replaced): also leaves to the general path the items of
-- organizations holding money in holds past their time, which the sweep is yet to expire (the
-- batch body counts every open hold as held; the general path expires them first, under the
-- same locks: LedgerStore.expire_due_holds). Read after the lock, in a statement of its own: what a
-- sweep committed while the batch waited is seen.
CREATE OR REPLACE FUNCTION post_transfer_batch(
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
    v_holding uuid[];
    v_due uuid[];
    v_currencies text[] := p_currencies;
    i int;
BEGIN
    SELECT array_agg(w.organization_id) FILTER (WHERE w.held_balance > 0) INTO v_holding
    FROM (SELECT w.organization_id, w.held_balance FROM wallets w
          WHERE w.organization_id = ANY(p_orgs) ORDER BY w.organization_id FOR UPDATE) w;
    IF v_holding IS NOT NULL THEN
        SELECT array_agg(DISTINCT h.organization_id) INTO v_due FROM holds h
        WHERE h.organization_id = ANY(v_holding) AND h.status = 'open' AND h.expires_at <= now();
    END IF;
    IF p_kyc_limited AND 'topup' = ANY(p_kinds) THEN
        SELECT array_agg(o.id) INTO v_unverified FROM organizations o
        WHERE o.id = ANY(p_orgs) AND o.kyc_status <> 'verified';
    END IF;
    -- Under OR the EXISTS stays a probe of the key's index per item (as a join it could be
    -- planned as a scan of the whole table, which holds every account call's answers too).
    SELECT array_agg(x.i) INTO v_general
    FROM unnest(p_idx, p_kinds, p_keys, p_fingerprints) WITH ORDINALITY AS x (k, kind, key, fp, i)
    WHERE (x.kind = 'topup' AND p_orgs[x.k] = ANY(v_unverified))
       OR p_orgs[x.k] = ANY(v_due)
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
