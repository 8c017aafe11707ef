-- Let balance updates of wallets be HOT (heap-only: no index entries, no index bloat).
--
-- Every transfer updates its wallet's balance and changed_at. An index on changed_at (the
-- announcer's wallets_unannounced) made each of those updates write new entries into every
-- index of wallets, so a busy organization's row left a trail of dead index entries that each
-- later lookup walked. The announcer now looks up by key the wallets its process changed, and
-- scans them all only now and then (see gpudeck.wallet.workers.announce_balances); pages keep
-- room for new row versions.
DROP INDEX IF EXISTS wallets_unannounced;
ALTER TABLE wallets SET (fillfactor = 50);
ALTER TABLE ledger_accounts SET (fillfactor = 70);
