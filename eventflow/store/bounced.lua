-- A delivery status notification came back for a sent event: it ends ``bounced``, with
-- the recipient's status and diagnostic in its history entry and ``last_error``, counted,
-- kept for the retention time. Only a delivered event changes; another one (still being
-- sent, never sent, or dead-lettered) keeps its status and gets the entry in its history
-- only. KEYS: event, history, stats.
-- ARGV: now, last error, history entry, retention seconds.
-- Returns the status the event has after the call, or false when it is unknown.
--
-- Run twice (the same DSN posted again) on a delivered event: the second run finds it
-- bounced, adds no entry and counts nothing again.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'bounced' then return status end
if status ~= 'delivered' then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  return status
end
redis.call('HSET', KEYS[1], 'status', 'bounced', 'updated_at', ARGV[1], 'last_error', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'bounced', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 'bounced'
