-- Usage events: an event id is unique within its organization, as every idempotency key is (one
-- tenant's id refused another's event, whose usage went unbilled). Quantities are kept and summed
-- as exact decimals (the shortest decimal that prints each, as its cost is reckoned): summed as
-- double precision, ten events of 0.1 showed 0.9999999999999999. An event's quantity becomes
-- that shortest decimal (its text form: a retry is compared with it, and a cast keeps only 15
-- digits); existing sums become the nearest 15-digit decimal, which undoes their drift.
SET LOCAL extra_float_digits = 1;  -- the shortest exact text (the default; set whatever was)
ALTER TABLE usage_events DROP CONSTRAINT usage_events_pkey,
    ADD PRIMARY KEY (organization_id, event_id);

ALTER TABLE usage_events ALTER COLUMN quantity TYPE numeric USING quantity::text::numeric;
ALTER TABLE usage_hourly ALTER COLUMN quantity TYPE numeric;
ALTER TABLE usage_daily ALTER COLUMN quantity TYPE numeric;
ALTER TABLE usage_totals ALTER COLUMN quantity TYPE numeric;

-- 006's function with a numeric quantity (the trigger calls it by name).
DROP FUNCTION usage_rollups_add(usage_hourly, bigint, bigint, double precision, bigint);
CREATE FUNCTION usage_rollups_add(
    k usage_hourly, p_calls bigint, p_errors bigint, p_quantity numeric, p_cost bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS d (organization_id, day, meter, model, calls, errors, quantity,
                                  cost)
    VALUES (k.organization_id, (k.hour AT TIME ZONE 'UTC')::date, k.meter, k.model, p_calls,
            p_errors, p_quantity, p_cost)
    ON CONFLICT (organization_id, day, meter, model) DO UPDATE
    SET calls = d.calls + excluded.calls, errors = d.errors + excluded.errors,
        quantity = d.quantity + excluded.quantity, cost = d.cost + excluded.cost;

    INSERT INTO usage_totals AS t (organization_id, meter, dimension, value, calls, errors,
                                   quantity, cost)
    SELECT k.organization_id, k.meter, v.dimension, v.value, p_calls, p_errors, p_quantity,
           p_cost
    FROM (VALUES ('api', k.api), ('model', k.model), ('provider', k.provider),
                 ('region', k.region)) AS v (dimension, value)
    WHERE v.value <> ''
    ORDER BY v.dimension
    ON CONFLICT (organization_id, meter, dimension, value) DO UPDATE
    SET calls = t.calls + excluded.calls, errors = t.errors + excluded.errors,
        quantity = t.quantity + excluded.quantity, cost = t.cost + excluded.cost;
END
$$;
