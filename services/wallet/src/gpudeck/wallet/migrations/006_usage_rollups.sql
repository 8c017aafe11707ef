-- Rollups of usage_hourly that keep the usage dashboard flat in history length: per day and
-- model (today's usage and the top models of the last 30 days), and per dimension value over all
-- time (the all-time breakdown). A trigger on usage_hourly keeps them in step in the same
-- transaction as every write to it (RecordUsage's upsert or any other), so they always say what
-- summing usage_hourly says. Rows deleted from usage_hourly (retention) stay counted here.

CREATE TABLE usage_daily (
    organization_id  uuid NOT NULL,
    day              date NOT NULL,  -- UTC
    meter            text NOT NULL,
    model            text NOT NULL,
    calls            bigint NOT NULL DEFAULT 0,
    errors           bigint NOT NULL DEFAULT 0,
    quantity         double precision NOT NULL DEFAULT 0,
    cost             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, meter, model)
);

-- Per dimension (model, provider, region, api) and value that is set; '' values are left out.
CREATE TABLE usage_totals (
    organization_id  uuid NOT NULL,
    meter            text NOT NULL,
    dimension        text NOT NULL,
    value            text NOT NULL,
    calls            bigint NOT NULL DEFAULT 0,
    errors           bigint NOT NULL DEFAULT 0,
    quantity         double precision NOT NULL DEFAULT 0,
    cost             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, meter, dimension, value)
);

-- Add (calls, errors, quantity, cost) to the rollup rows of the usage_hourly row `k`. Totals are
-- locked in a fixed order (by dimension) so concurrent writers cannot deadlock on them.
CREATE FUNCTION usage_rollups_add(
    k usage_hourly, p_calls bigint, p_errors bigint, p_quantity double precision, p_cost bigint)
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

CREATE FUNCTION usage_hourly_rolls_up() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM usage_rollups_add(NEW, NEW.calls, NEW.errors, NEW.quantity, NEW.cost);
    ELSIF (OLD.organization_id, OLD.hour, OLD.meter, OLD.model, OLD.provider, OLD.region,
           OLD.api) = (NEW.organization_id, NEW.hour, NEW.meter, NEW.model, NEW.provider,
                       NEW.region, NEW.api) THEN
        PERFORM usage_rollups_add(NEW, NEW.calls - OLD.calls, NEW.errors - OLD.errors,
                                  NEW.quantity - OLD.quantity, NEW.cost - OLD.cost);
    ELSE
        PERFORM usage_rollups_add(OLD, -OLD.calls, -OLD.errors, -OLD.quantity, -OLD.cost);
        PERFORM usage_rollups_add(NEW, NEW.calls, NEW.errors, NEW.quantity, NEW.cost);
    END IF;
    RETURN NULL;
END
$$;

-- Created before the backfill: its lock holds writers of usage_hourly off until this commits,
-- so no write falls between the backfill and the trigger.
CREATE TRIGGER usage_hourly_rolls_up AFTER INSERT OR UPDATE ON usage_hourly
FOR EACH ROW EXECUTE FUNCTION usage_hourly_rolls_up();

INSERT INTO usage_daily (organization_id, day, meter, model, calls, errors, quantity, cost)
SELECT organization_id, (hour AT TIME ZONE 'UTC')::date, meter, model, sum(calls), sum(errors),
       sum(quantity), sum(cost)
FROM usage_hourly
GROUP BY 1, 2, 3, 4;

INSERT INTO usage_totals (organization_id, meter, dimension, value, calls, errors, quantity, cost)
SELECT h.organization_id, h.meter, v.dimension, v.value, sum(h.calls), sum(h.errors),
       sum(h.quantity), sum(h.cost)
FROM usage_hourly h
CROSS JOIN LATERAL (VALUES ('api', h.api), ('model', h.model), ('provider', h.provider),
                           ('region', h.region)) AS v (dimension, value)
WHERE v.value <> ''
GROUP BY 1, 2, 3, 4;
