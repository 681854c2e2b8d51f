-- wrk script: POST KServe v1 bodies. ROWS rows per request (default 1); with REPEAT=1 the same
-- body every time (cache hits), else fresh random diabetes-scale rows (cache misses).
local rows = tonumber(os.getenv("ROWS") or "1")
local repeated = os.getenv("REPEAT") == "1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local function body()
  local parts = {}
  for r = 1, rows do
    local values = {}
    for i = 1, 10 do values[i] = string.format("%.6f", (math.random() - 0.5) * 0.2) end
    parts[r] = "[" .. table.concat(values, ",") .. "]"
  end
  return '{"instances": [' .. table.concat(parts, ",") .. ']}'
end

function init(args)
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
  if repeated then wrk.body = body() end
end

function request()
  if repeated then return wrk.format() end
  return wrk.format(nil, nil, nil, body())
end
