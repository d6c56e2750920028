-- Read-only: the key ring's version counter, on Redis Cluster, where it lives in a slot of
-- its own and state.lua cannot read it (a script, not a GET: it takes the lean path).
-- KEYS[1] the counter. Returns it, 0 while unset.
return tonumber(redis.call('GET', KEYS[1]) or '0')
