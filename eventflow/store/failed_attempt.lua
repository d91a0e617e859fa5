-- One failed attempt: its history entry, the ledger reset, the counters and the
-- send-duration histogram; when it will be retried, the status ``retrying`` and the lease
-- given back. KEYS: event, history, stats, timing, lease. ARGV: now, history entry, error,
-- failure kind, retried ('1' or '0'), duration seconds, the error type to dead-letter it
-- as ('' for none: kept in the record so that a later run dead-letters it without sending
-- again if the dead letter itself could not be written), then the histogram buckets the
-- duration falls in. Returns 1, or 0 when it was recorded already.
--
-- Run twice (a reply lost, the call sent again): the entry, unique to the attempt (its
-- number, time and duration), ends the history after the first run, which the second
-- finds there: it changes nothing.
if not fenced(KEYS[1], KEYS[2], ARGV[8], ARGV[9]) then return 0 end
if redis.call('LINDEX', KEYS[2], -1) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'send', '', 'last_error', ARGV[3], 'updated_at', ARGV[1],
           'claimed', '0')
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'failures_' .. ARGV[4], 1)
for i = 10, #ARGV do redis.call('HINCRBY', KEYS[4], ARGV[i], 1) end
redis.call('HINCRBY', KEYS[4], 'count', 1)
redis.call('HINCRBYFLOAT', KEYS[4], 'sum', ARGV[6])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'status', 'retrying')
  redis.call('HINCRBY', KEYS[3], 'retried', 1)
  redis.call('DEL', KEYS[5])
elseif ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'failed_as', ARGV[7])
end
return 1
