-- post_transfer: one same-currency top-up, charge, usage, refund or adjustment in ONE statement.
--
-- The rules are those of gpudeck.wallet.ledger (Book.apply), kept in step by tests that run the
-- same transfers through both paths: lock the wallet; a retry with the same key and payload
-- returns the first transaction; charges spend unexpired credits before cash (the first to
-- expire first) and are refused when spendable (balance − held − expired credits) is short;
-- every posting keeps its balance before and after; the platform account takes the other side.
-- The caller builds the event (it knows everything in it) and the function writes it to the
-- outbox in the same transaction. A refusal raises with HINT '<CODE>:<field>'. Top-ups above
-- p_kyc_limit (0: none) need a KYC-verified organization.

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
#variable_conflict use_column
DECLARE
    w wallets%ROWTYPE;
    v_now timestamptz := now();
    v_found record;
    v_acct record;
    v_left bigint;
    v_take bigint;
    v_expired bigint;
    v_after bigint;
    v_total bigint := 0;         -- what the organization's accounts moved, summed
    v_credit_delta bigint := 0;  -- the credit part of it
    v_ids bigint[] := '{}';
    v_codes text[] := '{}';
    v_amounts bigint[] := '{}';
    v_befores bigint[] := '{}';
    v_afters bigint[] := '{}';
    v_spend bigint;
    v_platform bigint;
BEGIN
    SELECT * INTO w FROM wallets WHERE organization_id = p_org FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'organization % not found', p_org USING HINT = 'NOT_FOUND:organization_id';
    END IF;
    IF p_currency <> '' AND p_currency <> w.currency THEN
        RAISE EXCEPTION 'currency % is not the wallet currency %', p_currency, w.currency
            USING HINT = 'INVALID_ARGUMENT:currency';
    END IF;
    IF p_kind = 'topup' AND p_kyc_limit > 0 AND p_amount > p_kyc_limit
       AND (SELECT o.kyc_status FROM organizations o WHERE o.id = p_org) <> 'verified' THEN
        RAISE EXCEPTION 'top-ups above % % need a KYC-verified organization',
            to_char(p_kyc_limit / 1000000.0, 'FM999999999990.000000'), w.currency
            USING HINT = 'KYC_REQUIRED:amount';
    END IF;
    IF p_fingerprint IS NOT NULL THEN
        SELECT t.id, t.fingerprint INTO v_found FROM transactions t
        WHERE t.organization_id = p_org AND t.idempotency_key = p_key;
        IF FOUND THEN
            IF v_found.fingerprint IS DISTINCT FROM p_fingerprint THEN
                RAISE EXCEPTION 'idempotency_key % was already used with a different request',
                    quote_literal(p_key) USING HINT = 'ABORTED:idempotency_key';
            END IF;
            RETURN QUERY SELECT v_found.id, true, NULL::timestamptz, w.currency, w.balance,
                w.credits, w.held_balance, w.run_rate, w.level, 0::bigint, 0::bigint,
                0::float8, 0::float8, 0::bigint, NULL::text[], NULL::bigint[], NULL::bigint[],
                NULL::bigint[];
            RETURN;
        END IF;
    END IF;

    IF p_kind IN ('topup', 'refund', 'adjustment') THEN
        UPDATE ledger_accounts a SET balance = a.balance + p_amount
        WHERE a.organization_id = p_org AND a.kind = 'cash'
        RETURNING a.id, a.code, a.balance INTO v_acct;
        v_ids := v_ids || v_acct.id;
        v_codes := v_codes || v_acct.code;
        v_amounts := v_amounts || p_amount;
        v_befores := v_befores || (v_acct.balance - p_amount);
        v_afters := v_afters || v_acct.balance;
        v_total := p_amount;
    ELSIF p_kind IN ('charge', 'usage') THEN
        SELECT coalesce(sum(a.balance), 0) INTO v_expired FROM ledger_accounts a
        WHERE a.organization_id = p_org AND a.kind = 'credit' AND a.balance > 0
          AND a.expires_at <= v_now;
        IF p_kind = 'charge' AND NOT p_allow_overdraft
           AND w.balance - w.held_balance - v_expired < p_amount THEN
            RAISE EXCEPTION 'insufficient funds: spendable % % < amount %',
                to_char((w.balance - w.held_balance - v_expired) / 1000000.0, 'FM999999999990.000000'),
                w.currency, to_char(p_amount / 1000000.0, 'FM999999999990.000000')
                USING HINT = 'INSUFFICIENT_FUNDS:amount';
        END IF;
        v_left := p_amount;
        FOR v_acct IN
            SELECT a.id, a.code, a.balance FROM ledger_accounts a
            WHERE a.organization_id = p_org AND a.kind = 'credit' AND a.balance > 0
              AND (a.expires_at IS NULL OR a.expires_at > v_now)
            ORDER BY a.expires_at NULLS LAST, a.id
            FOR UPDATE
        LOOP
            EXIT WHEN v_left = 0;
            v_take := least(v_acct.balance, v_left);
            UPDATE ledger_accounts a SET balance = a.balance - v_take WHERE a.id = v_acct.id
            RETURNING a.balance INTO v_after;
            v_ids := v_ids || v_acct.id;
            v_codes := v_codes || v_acct.code;
            v_amounts := v_amounts || (-v_take);
            v_befores := v_befores || (v_after + v_take);
            v_afters := v_afters || v_after;
            v_left := v_left - v_take;
            v_credit_delta := v_credit_delta - v_take;
        END LOOP;
        IF v_left > 0 THEN
            UPDATE ledger_accounts a SET balance = a.balance - v_left
            WHERE a.organization_id = p_org AND a.kind = 'cash'
            RETURNING a.id, a.code, a.balance INTO v_acct;
            v_ids := v_ids || v_acct.id;
            v_codes := v_codes || v_acct.code;
            v_amounts := v_amounts || (-v_left);
            v_befores := v_befores || (v_acct.balance + v_left);
            v_afters := v_afters || v_acct.balance;
        END IF;
        v_total := -p_amount;
    ELSE
        RAISE EXCEPTION 'post_transfer does not handle kind %', p_kind USING HINT = 'INVALID_ARGUMENT:kind';
    END IF;

    -- Any shard of the platform pool that no other transaction holds (see 002_ledger.sql).
    SELECT a.id INTO v_platform FROM ledger_accounts a
    WHERE a.kind = 'platform' AND a.platform_pool = p_platform || ':' || w.currency
    ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        SELECT a.id INTO v_platform FROM ledger_accounts a
        WHERE a.kind = 'platform' AND a.platform_pool = p_platform || ':' || w.currency
        ORDER BY random() LIMIT 1 FOR UPDATE;
    END IF;
    UPDATE ledger_accounts a SET balance = a.balance - v_total WHERE a.id = v_platform
    RETURNING a.id, a.code, a.balance INTO v_acct;
    v_ids := v_ids || v_acct.id;
    v_codes := v_codes || v_acct.code;
    v_amounts := v_amounts || (-v_total);
    v_befores := v_befores || (v_acct.balance + v_total);
    v_afters := v_afters || v_acct.balance;

    INSERT INTO transactions (id, organization_id, kind, amount, currency, payment_amount,
        payment_currency, description, project_id, resource_type, resource_id, reference,
        idempotency_key, fingerprint, actor, balance_after, created_at)
    VALUES (p_id, p_org, p_kind, p_amount, w.currency,
        CASE WHEN p_kind = 'topup' THEN p_amount END, CASE WHEN p_kind = 'topup' THEN w.currency END,
        p_description, p_project, p_resource_type, p_resource_id, p_reference, p_key,
        p_fingerprint, p_actor, w.balance + v_total, v_now);
    INSERT INTO postings (transaction_id, account_id, amount, balance_before, balance_after)
    SELECT p_id, x.i, x.a, x.b, x.f FROM unnest(v_ids, v_amounts, v_befores, v_afters) AS x(i, a, b, f);
    UPDATE wallets SET balance = wallets.balance + v_total, credits = wallets.credits + v_credit_delta,
        changed_at = v_now, updated_at = v_now
    WHERE organization_id = p_org;

    IF p_kind IN ('charge', 'usage', 'refund') THEN
        v_spend := CASE WHEN p_kind = 'refund' THEN -p_amount ELSE p_amount END;
        INSERT INTO daily_spend AS d (organization_id, day, resource_type, amount)
        VALUES (p_org, (v_now AT TIME ZONE 'UTC')::date, coalesce(nullif(p_resource_type, ''), 'other'), v_spend)
        ON CONFLICT (organization_id, day, resource_type) DO UPDATE SET amount = d.amount + excluded.amount;
        IF p_resource_id <> '' THEN
            INSERT INTO resource_costs AS r (organization_id, resource_id, resource_type, project_id,
                total, first_charged_at, last_charged_at)
            VALUES (p_org, p_resource_id, coalesce(nullif(p_resource_type, ''), 'other'), p_project,
                v_spend, v_now, v_now)
            ON CONFLICT (organization_id, resource_id) DO UPDATE
            SET total = r.total + excluded.total, last_charged_at = excluded.last_charged_at;
        END IF;
    END IF;

    -- Wake the relay only when the outbox was empty: a busy relay is reading it anyway, and
    -- notifying transactions commit one at a time (see gpudeck.kit.events.outbox).
    IF (SELECT min(o.id) FROM outbox o) IS NULL THEN
        PERFORM pg_notify(p_channel, '');
    END IF;
    INSERT INTO outbox (event_id, type, data) VALUES (p_event_id, p_event_type, p_event);

    RETURN QUERY
    SELECT p_id, false, v_now, w.currency, w.balance + v_total, w.credits + v_credit_delta,
        w.held_balance, w.run_rate, w.level,
        coalesce(t.warning_amount, 0), coalesce(t.critical_amount, 0),
        coalesce(t.warning_hours, 0), coalesce(t.critical_hours, 0),
        CASE WHEN u.enabled THEN u.below ELSE 0 END,
        v_codes, v_amounts, v_befores, v_afters
    FROM (SELECT 1) one
    LEFT JOIN thresholds t ON t.organization_id = p_org
    LEFT JOIN auto_topups u ON u.organization_id = p_org;
END
$$;
