-- Revoke families. KEYS: family hashes. ARGV: now ms, reason, [token hash].
-- With a token hash, the (single) family is revoked only if the hash is its current or a
-- used token, so a guessed session id cannot be used to revoke someone else's session.
-- Returns how many active families were revoked.
local count = 0
for _, fam in ipairs(KEYS) do
  local state, cur = unpack(redis.call('HMGET', fam, 'state', 'cur'))
  local owned = ARGV[3] == nil or cur == ARGV[3] or redis.call('HEXISTS', fam, 'u:' .. ARGV[3]) == 1
  if state == 'active' and owned then
    redis.call('HSET', fam, 'state', 'revoked', 'revoked_at', ARGV[1], 'reason', ARGV[2])
    count = count + 1
  end
end
return count
