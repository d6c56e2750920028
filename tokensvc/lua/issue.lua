-- Start a refresh family. One atomic step.
-- KEYS[1] family hash   KEYS[2] subject's session index (zset sid -> expiry ms)
-- ARGV: sid, token hash, now ms, token expiry ms, family expiry ms, subject, client_id,
--       label, claims (JSON carried to every access token of the family)
local fam, sessions = KEYS[1], KEYS[2]
local now, fam_exp = tonumber(ARGV[3]), tonumber(ARGV[5])
redis.call('HSET', fam,
  'state', 'active', 'cur', ARGV[2], 'cur_exp', ARGV[4], 'created', ARGV[3],
  'last', ARGV[3], 'exp', ARGV[5], 'sub', ARGV[6], 'cid', ARGV[7], 'label', ARGV[8],
  'claims', ARGV[9])
redis.call('PEXPIREAT', fam, fam_exp)
redis.call('ZREMRANGEBYSCORE', sessions, '-inf', now)
redis.call('ZADD', sessions, fam_exp, ARGV[1])
local newest = redis.call('ZRANGE', sessions, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', sessions, tonumber(newest[2]))
return 1
