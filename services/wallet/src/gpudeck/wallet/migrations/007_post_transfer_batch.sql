-- post_transfer_batch: many same-currency top-ups, charges, usage, refunds and adjustments of
-- organizations without credits, in ONE statement: the set-based fast path of post_transfers.
--
-- The rules are those of gpudeck.wallet.ledger (Book.apply), kept in step by tests that run the
-- same transfers through both: wallets are locked in organization order; items apply in order,
-- each seeing the balances the earlier ones left; a charge is refused when spendable (balance −
-- held) is short; every posting keeps its balance before and after; one shard of each platform
-- pool takes the other side of all items. Then every row is written set-based: transactions,
-- postings, balances, rollups and the items' events (built by the caller) to the outbox.
--
-- The caller sends each (organization, key) once and only organizations whose items all fit
-- this path. Per item it answers a status: OK, REPLAY (an earlier transaction has this key and
-- payload: found_ids), ABORTED (same key, other payload), NOT_FOUND, KYC_REQUIRED,
-- INSUFFICIENT_FUNDS (afters holds the spendable then), or DEFER: the organization has credits,
-- or the item names another currency; that item and the organization's later ones are left for
-- the general path (Book), which runs after this in the same transaction.

CREATE OR REPLACE FUNCTION post_transfer_batch(
    p_ids uuid[], p_idx int[], p_orgs uuid[], p_kinds text[], p_amounts bigint[],
    p_currencies text[], p_descriptions text[], p_projects uuid[], p_resource_types text[],
    p_resource_ids text[], p_references text[], p_keys text[], p_fingerprints bytea[],
    p_actors text[], p_event_ids text[], p_event_types text[], p_events bytea[],
    p_channel text, p_kyc_limit bigint)
RETURNS TABLE (
    created_at timestamptz, statuses text[], found_ids uuid[], afters bigint[],
    cash_befores bigint[], platform_befores bigint[], platform_slots int[], platform_codes text[],
    cash_codes text[], currencies text[], balances bigint[], run_rates bigint[],
    levels text[], warning_amounts bigint[], critical_amounts bigint[],
    warning_hours double precision[], critical_hours double precision[],
    auto_topup_below bigint[])
LANGUAGE plpgsql
-- Its statements take arrays; with their real sizes the planner finds custom plans cheaper and
-- would plan every statement anew on every call, which costs more than running them.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    n int := coalesce(cardinality(p_ids), 0);
    m int := coalesce(cardinality(p_orgs), 0);
    v_now timestamptz := now();
    -- per organization (index into p_orgs)
    o_found boolean[]; o_currency text[]; o_balance bigint[]; o_credits bigint[];
    o_held bigint[]; o_rate bigint[]; o_level text[]; o_verified boolean[];
    o_cash_id bigint[]; o_cash_code text[]; o_cash bigint[];
    o_wa bigint[]; o_ca bigint[]; o_wh double precision[]; o_ch double precision[];
    o_below bigint[];
    o_deferred boolean[] := array_fill(false, ARRAY[m]);
    o_touched boolean[] := array_fill(false, ARRAY[m]);
    -- per item
    s text[] := array_fill(''::text, ARRAY[n]);
    f_ids uuid[]; f_fps bytea[];
    v_after bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_delta bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_cash_before bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_plat_before bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_slot int[] := array_fill(NULL::int, ARRAY[n]);
    -- the platform shards taken, one per pool
    pools text[] := '{}'; pool_ids bigint[] := '{}'; pool_codes text[] := '{}';
    pool_bal bigint[] := '{}';
    k int; d bigint; q int; v_kind text; v_pool text; r record; v_ok int := 0;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    -- Lock first, then read in the next statement: its snapshot sees what the transactions we
    -- waited for committed (a join read with the lock could pair the wallet's new version with
    -- its cash account's old one).
    PERFORM 1 FROM wallets w WHERE w.organization_id = ANY(p_orgs)
    ORDER BY w.organization_id FOR UPDATE;
    -- The organizations' wallets and accounts, and earlier transactions with these keys (one
    -- index probe each), in one statement.
    SELECT r.*, e.*
    INTO o_found, o_currency, o_balance, o_credits, o_held, o_rate, o_level, o_verified,
         o_cash_id, o_cash_code, o_cash, o_wa, o_ca, o_wh, o_ch, o_below, f_ids, f_fps
    FROM (
        SELECT array_agg(w.organization_id IS NOT NULL ORDER BY x.i),
               array_agg(w.currency ORDER BY x.i), array_agg(w.balance ORDER BY x.i),
               array_agg(w.credits ORDER BY x.i), array_agg(w.held_balance ORDER BY x.i),
               array_agg(w.run_rate ORDER BY x.i), array_agg(w.level ORDER BY x.i),
               array_agg(w.verified ORDER BY x.i), array_agg(w.cash_account_id ORDER BY x.i),
               array_agg(w.code ORDER BY x.i), array_agg(w.cash ORDER BY x.i),
               array_agg(w.wa ORDER BY x.i), array_agg(w.ca ORDER BY x.i),
               array_agg(w.wh ORDER BY x.i), array_agg(w.ch ORDER BY x.i),
               array_agg(w.below ORDER BY x.i)
        FROM unnest(p_orgs) WITH ORDINALITY AS x (o, i)
        LEFT JOIN LATERAL (  -- per organization, so every table is read by its key
            SELECT w.organization_id, w.currency, w.balance, w.credits, w.held_balance,
                   w.run_rate, w.level, g.kyc_status = 'verified' AS verified,
                   w.cash_account_id, a.code, a.balance AS cash,
                   coalesce(t.warning_amount, 0) AS wa, coalesce(t.critical_amount, 0) AS ca,
                   coalesce(t.warning_hours, 0) AS wh, coalesce(t.critical_hours, 0) AS ch,
                   CASE WHEN u.enabled THEN u.below ELSE 0 END AS below
            FROM wallets w
            JOIN organizations g ON g.id = w.organization_id
            JOIN ledger_accounts a ON a.id = w.cash_account_id
            LEFT JOIN thresholds t ON t.organization_id = w.organization_id
            LEFT JOIN auto_topups u ON u.organization_id = w.organization_id
            WHERE w.organization_id = x.o
        ) w ON true
    ) r, (
        SELECT array_agg(t.id ORDER BY x.i), array_agg(t.fingerprint ORDER BY x.i)
        FROM unnest(p_idx, p_keys) WITH ORDINALITY AS x (k, key, i)
        LEFT JOIN LATERAL (
            SELECT t.id, t.fingerprint FROM transactions t
            WHERE t.organization_id = p_orgs[x.k] AND t.idempotency_key = x.key LIMIT 1
        ) t ON true
    ) e;

    FOR i IN 1..n LOOP
        k := p_idx[i];
        IF NOT o_found[k] THEN
            s[i] := 'NOT_FOUND';
            CONTINUE;
        END IF;
        IF o_deferred[k] OR o_credits[k] <> 0
           OR (p_currencies[i] <> '' AND p_currencies[i] <> o_currency[k]) THEN
            o_deferred[k] := true;
            s[i] := 'DEFER';
            CONTINUE;
        END IF;
        IF f_ids[i] IS NOT NULL THEN
            s[i] := CASE WHEN f_fps[i] IS NOT DISTINCT FROM p_fingerprints[i]
                         THEN 'REPLAY' ELSE 'ABORTED' END;
            CONTINUE;
        END IF;
        v_kind := p_kinds[i];
        d := p_amounts[i];
        IF v_kind = 'topup' AND p_kyc_limit > 0 AND d > p_kyc_limit AND NOT o_verified[k] THEN
            s[i] := 'KYC_REQUIRED';
            CONTINUE;
        END IF;
        IF v_kind = 'charge' OR v_kind = 'usage' THEN
            IF v_kind = 'charge' AND o_balance[k] - o_held[k] < d THEN
                s[i] := 'INSUFFICIENT_FUNDS';
                v_after[i] := o_balance[k] - o_held[k];
                CONTINUE;
            END IF;
            d := -d;
        END IF;
        v_pool := CASE v_kind WHEN 'topup' THEN 'funding' WHEN 'adjustment' THEN 'adjustments'
                  ELSE 'revenue' END || ':' || o_currency[k];
        q := array_position(pools, v_pool);
        IF q IS NULL THEN
            -- Any shard that no other transaction holds (see 002_ledger.sql); else wait for one.
            SELECT a.id, a.code, a.balance INTO r FROM ledger_accounts a
            WHERE a.kind = 'platform' AND a.platform_pool = v_pool
            ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                SELECT a.id, a.code, a.balance INTO r FROM ledger_accounts a
                WHERE a.kind = 'platform' AND a.platform_pool = v_pool
                ORDER BY random() LIMIT 1 FOR UPDATE;
            END IF;
            pools := pools || v_pool;
            pool_ids := pool_ids || r.id;
            pool_codes := pool_codes || r.code;
            pool_bal := pool_bal || r.balance;
            q := cardinality(pools);
        END IF;
        v_delta[i] := d;
        v_cash_before[i] := o_cash[k];
        o_cash[k] := o_cash[k] + d;
        o_balance[k] := o_balance[k] + d;
        v_plat_before[i] := pool_bal[q];
        pool_bal[q] := pool_bal[q] - d;
        v_slot[i] := q;
        v_after[i] := o_balance[k];
        o_touched[k] := true;
        s[i] := 'OK';
        v_ok := v_ok + 1;
    END LOOP;

    IF v_ok > 0 THEN
        WITH x AS (
            SELECT x.*, o.org, o.currency, o.cash_id
            FROM unnest(p_ids, p_idx, p_kinds, p_amounts, p_descriptions, p_projects,
                        p_resource_types, p_resource_ids, p_references, p_keys, p_fingerprints,
                        p_actors, s, v_after, v_delta, v_cash_before, v_plat_before, v_slot)
                 WITH ORDINALITY
                 AS x (id, k, kind, amount, description, project, rtype, rid, ref, key, fp,
                       actor, st, after, d, cb, pb, q, i)
            JOIN unnest(p_orgs, o_currency, o_cash_id) WITH ORDINALITY AS o (org, currency, cash_id, k)
              ON o.k = x.k
            WHERE x.st = 'OK'
        ), t AS (
            INSERT INTO transactions (id, organization_id, kind, amount, currency, payment_amount,
                payment_currency, description, project_id, resource_type, resource_id, reference,
                idempotency_key, fingerprint, actor, balance_after, created_at)
            SELECT x.id, x.org, x.kind, x.amount, x.currency,
                   CASE WHEN x.kind = 'topup' THEN x.amount END,
                   CASE WHEN x.kind = 'topup' THEN x.currency END,
                   x.description, x.project, x.rtype, x.rid, x.ref, x.key, x.fp, x.actor, x.after,
                   v_now
            FROM x ORDER BY x.i
        ), spend AS (
            INSERT INTO daily_spend AS d (organization_id, day, resource_type, amount)
            SELECT x.org, (v_now AT TIME ZONE 'UTC')::date,
                   coalesce(nullif(x.rtype, ''), 'other'),
                   sum(CASE WHEN x.kind = 'refund' THEN -x.amount ELSE x.amount END)
            FROM x WHERE x.kind IN ('charge', 'usage', 'refund')
            GROUP BY 1, 3 ORDER BY 1, 3
            ON CONFLICT (organization_id, day, resource_type)
            DO UPDATE SET amount = d.amount + excluded.amount
        ), costs AS (
            INSERT INTO resource_costs AS c (organization_id, resource_id, resource_type,
                project_id, total, first_charged_at, last_charged_at)
            SELECT x.org, x.rid,
                   (array_agg(coalesce(nullif(x.rtype, ''), 'other') ORDER BY x.i DESC))[1],
                   (array_agg(x.project ORDER BY x.i DESC))[1],
                   sum(CASE WHEN x.kind = 'refund' THEN -x.amount ELSE x.amount END), v_now, v_now
            FROM x WHERE x.kind IN ('charge', 'usage', 'refund') AND x.rid <> ''
            GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (organization_id, resource_id) DO UPDATE
            SET total = c.total + excluded.total, last_charged_at = excluded.last_charged_at
        ), posted AS (
            INSERT INTO postings (transaction_id, account_id, amount, balance_before, balance_after)
            SELECT p.id, p.account, p.amount, p.before, p.before + p.amount
            FROM (
                SELECT x.id, x.cash_id AS account, x.d AS amount, x.cb AS before, x.i, 0 AS leg
                FROM x
                UNION ALL
                SELECT x.id, pool_ids[x.q], -x.d, x.pb, x.i, 1 FROM x
            ) p
            ORDER BY p.i, p.leg
        ), accounts AS (  -- the organizations' cash accounts and the platform shards
            UPDATE ledger_accounts a SET balance = u.b
            FROM (
                SELECT u.id, u.b FROM unnest(o_cash_id, o_cash, o_touched) AS u (id, b, t) WHERE u.t
                UNION ALL
                SELECT u.id, u.b FROM unnest(pool_ids, pool_bal) AS u (id, b)
            ) u
            WHERE a.id = u.id
        ), balances AS (
            UPDATE wallets w SET balance = u.b, changed_at = v_now, updated_at = v_now
            FROM unnest(p_orgs, o_balance, o_touched) AS u (o, b, t)
            WHERE u.t AND w.organization_id = u.o
        ), announced AS (
            INSERT INTO outbox (event_id, type, data)
            SELECT e.id, e.t, e.d
            FROM unnest(p_event_ids, p_event_types, p_events, s) WITH ORDINALITY AS e (id, t, d, st, i)
            WHERE e.st = 'OK'
            ORDER BY e.i
        )
        -- Wake the relay only when the outbox was empty (see gpudeck.kit.events.outbox); the
        -- statement's snapshot does not see the rows it adds.
        SELECT count(pg_notify(p_channel, '')) INTO v_ok
        FROM (SELECT 1) one WHERE (SELECT min(o.id) FROM outbox o) IS NULL;
    END IF;

    RETURN QUERY SELECT v_now, s, f_ids, v_after, v_cash_before, v_plat_before, v_slot,
        pool_codes, o_cash_code, o_currency, o_balance, o_rate, o_level, o_wa, o_ca,
        o_wh, o_ch, o_below;
END
$$;
