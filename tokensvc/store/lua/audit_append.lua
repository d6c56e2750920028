-- Append a batch of audit records to the capped stream in one call (tokensvc.audit).
-- KEYS[1]: the stream. ARGV[1]: MAXLEN (approximate). Then per record: the number of
-- field/value pairs N, then the N pairs. Returns the number of records appended.
local maxlen = ARGV[1]
local i, written = 2, 0
while i <= #ARGV do
  local pairs_count = tonumber(ARGV[i])
  local fields = {}
  for j = 1, pairs_count * 2 do
    fields[j] = ARGV[i + j]
  end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
  i = i + 1 + pairs_count * 2
  written = written + 1
end
return written
