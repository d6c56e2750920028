-- GCRA (generic cell rate algorithm), prepended to the scripts that rate-limit.
-- A key holds the theoretical arrival time (TAT, µs, Redis clock). With interval =
-- period / count and tolerance = period, a burst of `count` calls passes, then one per
-- interval. Microseconds keep high rates exact (1 000 000/s is still 1 µs apart).
-- Returns 0 (allowed, TAT advanced) or the ms to wait (nothing changed).
local function gcra(key, interval, tolerance)
  if interval <= 0 then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tat = math.max(tonumber(redis.call('GET', key) or now), now)
  local new_tat = tat + interval
  local wait = new_tat - tolerance - now
  if wait > 0 then return math.ceil(wait / 1000) end
  redis.call('SET', key, string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
  return 0
end
