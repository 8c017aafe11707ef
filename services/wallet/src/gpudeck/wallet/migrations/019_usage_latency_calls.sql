-- The average latency of calls is over the calls that measured one (latency_ms > 0): an event
-- without a latency (a per-token meter) counted as 0 ms and pulled the average down.
-- latency_calls counts them per hourly row. Rows written before this migration count every
-- call of a row whose summed latency is not zero (exact for rows of one kind of event; the
-- dashboard shows the last 24 hours, so any row of mixed kinds ages out of it within a day).
ALTER TABLE usage_hourly ADD COLUMN latency_calls bigint NOT NULL DEFAULT 0;
UPDATE usage_hourly SET latency_calls = calls WHERE latency_ms_sum <> 0;
