-- An automatic top-up whose payment did not come back in time is 'expired', not 'failed': the
-- payment may still succeed later, and CompleteTopUp then credits it (thresholds_store).
ALTER TABLE pending_topups DROP CONSTRAINT pending_topups_status_check;
ALTER TABLE pending_topups ADD CONSTRAINT pending_topups_status_check
    CHECK (status IN ('pending', 'completed', 'failed', 'expired'));
