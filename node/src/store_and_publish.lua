-- Stores one chat message in the history stream (XADD, capped) and publishes
-- it on the backplane as "<id> <json>", in one atomic step, once per uid: a
-- retry finds the uid's marker and returns the id the message was given.
-- KEYS: history stream, the uid's marker. ARGV: cap, the channels (one, or a
-- direct message's two users', separated by "\n"), payload, then the entry's
-- field/value pairs. Used by node/src/history.rs (and measured by bench's
-- `store-cost`).
local id = redis.call('GET', KEYS[2])
if id then return id end
id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[2], id, 'EX', 600)
for channel in string.gmatch(ARGV[2], '[^\n]+') do
  redis.call('PUBLISH', channel, id .. ' ' .. ARGV[3])
end
return id
