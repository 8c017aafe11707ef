-- The kit's event tables, created in every service's own schema (gpudeck.kit.events).

-- Events written in the same transaction as the change that caused them; the relay publishes
-- them to JetStream in `id` order and deletes each one once JetStream has acknowledged it.
CREATE TABLE outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL,
    type text NOT NULL,
    data bytea NOT NULL,  -- the serialized gpudeck.events.v1.Event
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Which events each consumer has handled: a row is inserted in the transaction that applies the
-- handler's effect, so a redelivered event finds its row and is not handled twice.
CREATE TABLE inbox (
    event_id text NOT NULL,
    consumer text NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, consumer)
);
-- Rows arrive in time order, so a BRIN index is enough to prune old ones, and nearly free.
CREATE INDEX inbox_handled_at ON inbox USING brin (handled_at);

-- Messages a consumer gave up on: unparseable ones, and events whose handler kept failing.
CREATE TABLE dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer text NOT NULL,
    subject text NOT NULL,
    event_id text,  -- NULL when the message is not an Event
    data bytea NOT NULL,
    error text NOT NULL,
    deliveries integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
