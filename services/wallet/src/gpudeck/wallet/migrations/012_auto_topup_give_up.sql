-- After MAX_AUTO_TOPUP_FAILURES automatic top-ups in a row fail (the payment was declined or
-- never came back), the rule turns itself off and says why. `failures` counts them; a completed
-- top-up, or saving the rule again, starts it over (and clears the reason).
ALTER TABLE auto_topups ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;
ALTER TABLE auto_topups ADD COLUMN IF NOT EXISTS disabled_reason text NOT NULL DEFAULT '';
