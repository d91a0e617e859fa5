-- Take up to ARGV[3] slots of the replay schedule, ARGV[1] ms apart from the previous
-- one, as many as lie at most ARGV[2] ms ahead. Returns {first slot ms, now ms, slots
-- taken, ms until the next slot is free (when fewer than asked were taken)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = tonumber(redis.call('GET', KEYS[1]) or '0')
if slot < now then slot = now end
local interval, window = tonumber(ARGV[1]), tonumber(ARGV[2])
if slot - now > window then return {slot, now, 0, slot - now - window} end
local taken = math.min(tonumber(ARGV[3]), math.floor((window - (slot - now)) / interval) + 1)
local next_slot = slot + taken * interval
redis.call('SET', KEYS[1], next_slot, 'PX', window + 60000)
return {slot, now, taken, next_slot - now - window}
