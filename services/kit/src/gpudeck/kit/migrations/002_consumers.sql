-- The durable JetStream consumers this service has made, by name. One made again (its durable
-- was lost: a NATS store wiped, a consumer deleted by hand) starts from the oldest event the
-- inbox still remembers, not from the start of the stream: older events were handled, and
-- their inbox rows pruned, so they would take effect twice (gpudeck.kit.events.consumer).
CREATE TABLE consumers (
    name text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
