-- Put an address on the suppression list, or replace its entry. KEYS: entry, index.
-- ARGV: address, reason, created_at, expires_at ('' for never), expiry as Unix seconds
-- ('' for never), event id, SMTP reply, keep ('1': an entry that never expires is kept as
-- it is, so that a bounce does not turn a manual entry or a complaint into one that expires).
-- Returns 1 when written, 0 when an entry was kept.
--
-- Run twice (a reply lost, the call sent again): the same entry is written again.
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[1]) == 1
    and redis.call('TTL', KEYS[1]) == -1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'address', ARGV[1], 'reason', ARGV[2], 'created_at', ARGV[3],
           'expires_at', ARGV[4], 'event_id', ARGV[6], 'smtp_reply', ARGV[7])
if ARGV[5] ~= '' then redis.call('EXPIREAT', KEYS[1], ARGV[5]) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
