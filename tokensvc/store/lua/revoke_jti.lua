-- Revoke one access token. KEYS: jti key[, revocation stream].
-- ARGV: token expiry (s), '1' if KEYS[2] is the stream, stream MINID, jti.
-- (feed.lua is prepended.)
redis.call('SET', KEYS[1], '1', 'EXAT', ARGV[1])
emit(ARGV[2] == '1' and KEYS[2] or nil, ARGV[3], 'token', ARGV[4], tonumber(ARGV[1]) * 1000)
return 1
