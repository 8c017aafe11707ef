-- wallet.balance.changed without waiting for busy wallets, and without losing a change.
--
-- The announcer stamped wallets.announced_at, so it had to lock the very row every transfer
-- locks; it skipped locked rows, and a wallet busy without pause went unheard for seconds. It
-- now keeps its stamp in a table of its own and reads the wallets' committed values as they are.
-- What was announced is a change counter, not a time: writers stamp changed_at with their
-- transaction's start, which a transaction that started earlier may commit after an
-- announcement; the counter, bumped under the row lock, only grows.
ALTER TABLE wallets ADD COLUMN IF NOT EXISTS change_seq bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION wallets_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := OLD.change_seq + 1;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS wallets_change_seq ON wallets;
CREATE TRIGGER wallets_change_seq BEFORE UPDATE ON wallets FOR EACH ROW
WHEN (NEW.balance IS DISTINCT FROM OLD.balance
      OR NEW.held_balance IS DISTINCT FROM OLD.held_balance
      OR NEW.run_rate IS DISTINCT FROM OLD.run_rate
      OR NEW.credits IS DISTINCT FROM OLD.credits
      OR NEW.level IS DISTINCT FROM OLD.level
      OR NEW.changed_at IS DISTINCT FROM OLD.changed_at)
EXECUTE FUNCTION wallets_count_change();

-- announced_seq: the change_seq last announced (-1: never); announced_at: when, for the
-- at-most-once-a-second rule. wallets.announced_at stays, unused.
CREATE TABLE IF NOT EXISTS wallet_announcements (
    organization_id  uuid PRIMARY KEY,
    announced_seq    bigint NOT NULL DEFAULT -1,
    announced_at     timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO wallet_announcements (organization_id, announced_seq, announced_at)
SELECT organization_id, CASE WHEN changed_at > announced_at THEN -1 ELSE 0 END, announced_at
FROM wallets
ON CONFLICT (organization_id) DO NOTHING;
