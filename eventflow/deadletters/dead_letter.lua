-- Move an event to the dead-letter queue, in one step: the letter (the event as accepted,
-- the failure and the history so far, built here so that what is read and what is
-- written cannot disagree), the queue, the record, the quota given back (nothing was
-- sent), the history and audit entries, the counter. Safe to run twice: a run with the
-- token of one that already wrote returns that letter and changes nothing, and an event
-- already dead-lettered, delivered or rate limited is left as it is.
-- Fenced (fence.lua) by the run that failed, when the failure handler knows it: a run
-- whose lease ran out and whose event a newer run took only notes ``superseded``.
-- KEYS: event, history, letter, dlq, audit, audit index, stats, lease, watch.
-- ARGV: id, error type, error, time (ISO), time ms, token, history entry, the failed
-- run's token ('' when not known), its superseded entry.
-- Returns the letter (JSON), or nil when nothing was dead-lettered.
local r = redis.call('HMGET', KEYS[1], 'status', 'user_id', 'event_type', 'payload',
                     'producer', 'attempts', 'dead_letter_token')
local status = r[1]
if not status then return false end
if r[7] == ARGV[6] then return redis.call('GET', KEYS[3]) end
if status == 'delivered' or status == 'rate_limited' or status == 'dead_lettered'
      or status == 'suppressed' or status == 'bounced' then
  return false
end
if not fenced(KEYS[1], KEYS[2], ARGV[8], ARGV[9]) then return false end
local function str(value) return cjson.encode(value or '') end
local attempts = string.format('%d', tonumber(r[6] or '0') or 0)
local letter = '{"id":' .. str(ARGV[1]) .. ',"event":{"user_id":' .. str(r[2])
  .. ',"event_type":' .. str(r[3]) .. ',"payload":' .. (r[4] or '{}') .. '},"producer":'
  .. (r[5] and str(r[5]) or 'null') .. ',"error_type":' .. str(ARGV[2]) .. ',"error":'
  .. str(ARGV[3]) .. ',"attempts":' .. attempts .. ',"failed_at":' .. str(ARGV[4])
  .. ',"history":[' .. table.concat(redis.call('LRANGE', KEYS[2], 0, -1), ',') .. ']}'
redis.call('SET', KEYS[3], letter)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'dead_lettered', 'last_error', ARGV[3],
           'updated_at', ARGV[4], 'send', '', 'claimed', '0', 'quota', '0',
           'dead_letter_token', ARGV[6])
redis.call('HDEL', KEYS[1], 'failed_as', 'take')
redis.call('ZREM', 'ef:quota:' .. (r[2] or ''), ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[7])
-- A dead letter is kept until it is deleted; so is the event it belongs to.
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('RPUSH', KEYS[5], '{"action":"dead_lettered","at":' .. str(ARGV[4])
           .. ',"error_type":' .. str(ARGV[2]) .. ',"error":' .. str(ARGV[3])
           .. ',"attempts":' .. attempts .. '}')
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[7], 'dead_lettered', 1)
redis.call('DEL', KEYS[8])
redis.call('ZREM', KEYS[9], ARGV[1])
return letter
