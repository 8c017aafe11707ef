-- The hourly rate a meter was opened with, so that opening it again with another rate (or
-- project) is refused as a reused key instead of silently keeping the first one. NULL for
-- meters opened before this column existed: their retries are compared without it.
ALTER TABLE meters ADD COLUMN IF NOT EXISTS opening_rate bigint;
