-- An automatic top-up requested again after an earlier one expired is 'cancelled' when that
-- earlier payment succeeds after all: one crossing of the rule adds its amount once. The
-- payment side is told (wallet.autotopup.cancelled); one it still completes is credited.
ALTER TABLE pending_topups DROP CONSTRAINT pending_topups_status_check;
ALTER TABLE pending_topups ADD CONSTRAINT pending_topups_status_check
    CHECK (status IN ('pending', 'completed', 'failed', 'expired', 'cancelled'));
