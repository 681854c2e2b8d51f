"""The wire between the API and the workers: everything both sides must agree on.

Every Redis key and channel, the byte layout of a queue entry, the arguments of the predict
task, the message that wakes a waiting API process, and every Lua script live here, so a
change to the contract is a change to this one module. API modules (hueyserve.api) and worker
modules (hueyserve.worker) both import it; neither imports the other.
The module is over 300 lines on purpose: the whole contract is read in one place.

| Redis key or channel                 | type    | written by            | read by               |
|--------------------------------------|---------|-----------------------|-----------------------|
| Huey's queue (`huey.storage`)        | ZSET    | API, workers          | workers, API (depth)  |
| `<queue>:leases`                     | ZSET    | workers               | workers (reaper)      |
| `<queue>:doorbell`                   | LIST    | API, workers          | idle workers          |
| `<queue>:tick:<task>:<minute>`       | STRING  | workers (scheduler)   | workers (scheduler)   |
| Huey's result and revoke keys        | STRING  | workers, API (revoke) | API, workers          |
| `hueyserve:job:<id>`                 | HASH    | API, workers          | API, workers          |
| `hueyserve:events`                   | STREAM  | API, workers          | API (one reader each) |
| `hueyserve:idempotency:<key>`        | STRING  | API                   | API                   |
| `hueyserve:results:<api process>`    | channel | workers               | that API process      |
| `hueyserve:models` (+ `:changed`)    | HASH    | workers               | API, workers          |
| `hueyserve:models:lock`              | lock    | workers               | workers               |
| `hueyserve:models:versions`          | HASH    | workers               | workers               |
| `hueyserve:models:demos`             | SET     | workers               | workers               |
| `hueyserve:artifact:<sha256>`        | STRING  | API, workers          | workers               |
| `hueyserve:workers`                  | ZSET    | workers (heartbeat)   | API (readiness)       |
| `hueyserve:worker:<host:pid>`        | STRING  | workers (heartbeat)   | API (dashboard)       |
| `hueyserve:training`                 | lock    | workers               | workers               |
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from huey.api import Task

# --- keys and channels ------------------------------------------------------------------------

JOB_KEY_PREFIX = "hueyserve:job:"  #: + job id -> hash (hueyserve.jobs), TTL = result TTL
#: stream: every job state change (written with the record, in one script), model promotions
#: and deletions, worker joins and losses; trimmed to about HUEYSERVE_EVENTS_MAX_LEN entries
EVENTS_KEY = "hueyserve:events"
IDEMPOTENCY_PREFIX = "hueyserve:idempotency:"  #: + the client's Idempotency-Key -> job id
RESULT_CHANNEL_PREFIX = "hueyserve:results:"  #: + one id per API process: wake-ups
MODELS_KEY = "hueyserve:models"  #: hash: name -> ModelEntry JSON (hueyserve.models)
MODELS_CHANNEL = "hueyserve:models:changed"  #: pub/sub: an entry's JSON, or {"deleted": name}
MODELS_LOCK_KEY = "hueyserve:models:lock"  #: held by a worker while it changes an entry
#: hash: name -> the highest version ever allocated to it, in the whole deployment
VERSIONS_KEY = "hueyserve:models:versions"
DEMOS_KEY = "hueyserve:models:demos"  #: set: demo models created once in this deployment
ARTIFACT_PREFIX = "hueyserve:artifact:"  #: + SHA-256 -> a model file's bytes
HEARTBEATS_KEY = "hueyserve:workers"  #: sorted set: worker|proof -> time of its last beat
WORKER_STATUS_PREFIX = "hueyserve:worker:"  #: + host:pid -> JSON: running tasks, models, ...
TRAINING_LOCK_KEY = "hueyserve:training"  #: one training at a time across every worker
DOORBELL_TOKENS = 1024  #: most tokens kept: idle workers wake at most this often for nothing
#: The only `maxmemory-policy` under which Redis keeps every queued task and job record: under
#: any other, a full Redis silently drops them.
REQUIRED_EVICTION_POLICY = "noeviction"


def eviction_problem(policy: str | None) -> str | None:
    """Why a Redis with this `maxmemory-policy` must not hold jobs (None: it may, or the
    policy cannot be read, as on some managed services that refuse CONFIG)."""
    if policy is None or policy == REQUIRED_EVICTION_POLICY:
        return None
    return (
        f"Redis runs with maxmemory-policy {policy}: under memory pressure it drops queued "
        f"tasks and job records without an error; set maxmemory-policy {REQUIRED_EVICTION_POLICY}"
    )


def secret_proof(secret: str | None) -> str:
    """What a worker's heartbeat shows of its HUEYSERVE_SECRET: a keyed hash of a fixed text,
    equal for equal secrets, from which the secret cannot be recovered."""
    if secret is None:
        return "none"
    digest = hmac.new(secret.encode(), b"hueyserve worker secret proof v1", hashlib.sha256)
    return digest.hexdigest()[:32]


def heartbeat_member(worker: str, proof: str) -> str:
    """A worker's member in HEARTBEATS_KEY: its id (host:pid) and its secret proof."""
    return f"{worker}|{proof}"


def parse_heartbeat_member(member: str) -> tuple[str, str]:
    """(worker id, secret proof); a member from before proofs has the proof ''."""
    worker, _, proof = member.rpartition("|")
    return (worker, proof) if worker else (member, "")


def worker_status_key(worker: str) -> str:
    return WORKER_STATUS_PREFIX + worker


def artifact_key(digest: str) -> str:
    return ARTIFACT_PREFIX + digest


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def idempotency_key(client_key: str) -> str:
    return IDEMPOTENCY_PREFIX + client_key


def leases_key(queue_key: str) -> str:
    """Sorted set: a running task's queue entry -> its lease's expiry (unix seconds)."""
    return f"{queue_key}:leases"


def tick_key(queue_key: str, task_name: str, minute: str) -> str:
    """Claimed by the one consumer that enqueues a periodic task for that minute."""
    return f"{queue_key}:tick:{task_name}:{minute}"


def doorbell_key(queue_key: str) -> str:
    """List of tokens, one pushed per enqueue, on which idle workers block."""
    return f"{queue_key}:doorbell"


def revoke_id(task_id: str) -> str:
    """Huey's own name for the flag that revokes a task (store it under `result_key`)."""
    revoke: str = Task(id=task_id).revoke_id
    return revoke


# --- queue entries ----------------------------------------------------------------------------

PREFIX_BYTES = 8  #: huey's queue entries are an 8-byte timestamp, then the task message


def queue_entry(message: bytes) -> bytes:
    """Huey's entry layout: a microsecond prefix keeps FIFO order within a priority."""
    return (time.time_ns() // 1000).to_bytes(PREFIX_BYTES, "big") + message


def queue_score(priority: int | None) -> int:
    """The entry's score: the negated priority, so ZPOPMIN takes the most urgent."""
    return -(priority or 0)


def message_of(entry: bytes) -> bytes:
    """The task message inside a queue entry (for Huey's deserializer)."""
    return entry[PREFIX_BYTES:]


# --- task arguments ---------------------------------------------------------------------------

#: A group's jobs, in the order of their rows: (job id, row count).
Members = list[tuple[str, int]]


def predict_options(reply_to: str | None, members: Members | None = None) -> dict[str, Any]:
    """The predict task's keyword arguments: the channel of the API process that waits for
    it, and, for a group of sync requests, which rows belong to which job."""
    options: dict[str, Any] = {} if reply_to is None else {"reply_to": reply_to}
    if members:  # pairs as lists: cheaper to send than tuples (hueyserve.serializer)
        options["members"] = [[job_id, rows] for job_id, rows in members]
    return options


def reply_to(task: Task) -> str | None:
    """The channel of the API process waiting for the task's jobs, if any."""
    channel: str | None = (task.kwargs or {}).get("reply_to")
    return channel


def members(task: Task, rows: int = 0) -> Members:
    """The jobs a task answers: a group names them; otherwise the task is one job of `rows`."""
    named: Members | None = (task.kwargs or {}).get("members")
    return [(job_id, int(count)) for job_id, count in named] if named else [(task.id, rows)]


def job_ids(task: Task) -> list[str]:
    return [job_id for job_id, _ in members(task)]


# --- wake-ups ---------------------------------------------------------------------------------


def result_message(job_id: str, payload: bytes) -> bytes:
    """What a worker publishes once a job's result is stored: the id, then the serialized
    result or Error itself (so the waiter needs no read)."""
    return job_id.encode() + b" " + payload


def parse_result_message(data: bytes) -> tuple[str, bytes]:
    """Job ids are UUIDs (no spaces); the payload may hold any byte."""
    job_id, _, payload = data.partition(b" ")
    return job_id.decode(errors="replace"), payload


# --- Lua scripts ------------------------------------------------------------------------------

#: Lua, prepended to every script that changes a job record: the stream entry of a change,
#: added in the same script (so atomically) as the change itself. The entry carries the record's
#: identity and status after the change, `event` (what happened), `at`, the extra pairs given,
#: and once the job has ended its queue wait and run time in seconds.
JOB_EVENT_LUA = """
local function job_event(record, stream, maxlen, event, now, extra)
    local r = redis.call('HMGET', record, 'id', 'kind', 'model', 'version', 'status',
                         'created_at', 'started_at', 'finished_at', 'priority')
    local names = {'job', 'kind', 'model', 'version', 'status'}
    local fields = {'type', 'job', 'event', event, 'at', now}
    for i, name in ipairs(names) do
        if r[i] then fields[#fields + 1] = name; fields[#fields + 1] = r[i] end
    end
    if r[9] then fields[#fields + 1] = 'priority'; fields[#fields + 1] = r[9] end
    local created, started, finished = tonumber(r[6]), tonumber(r[7]), tonumber(r[8])
    if finished and started and created and event ~= 'progress' then
        fields[#fields + 1] = 'queued_s'; fields[#fields + 1] = tostring(started - created)
        fields[#fields + 1] = 'run_s'; fields[#fields + 1] = tostring(finished - started)
    end
    for i = 1, #extra do fields[#fields + 1] = extra[i] end
    return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
"""

#: API. KEYS: the queue, the submission's idempotency key ('' for none), the workers' doorbell,
#: the event stream, then each job record. ARGV: the depth limit (0: none), the task's score,
#: the entry, the records' TTL, the task's id, the doorbell's length, now, the stream's
#: length, then per record its number of fields followed by fields and values. Answers the id
#: of the job that holds: an earlier one with the same idempotency key, else this one once
#: queued; or 0 (refused) when as many tasks as the limit would run before or with this one
#: (same or higher priority).
ENQUEUE_SCRIPT = (
    JOB_EVENT_LUA
    + """
if KEYS[2] ~= '' then
    local earlier = redis.call('GET', KEYS[2])
    if earlier then return earlier end
end
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[2]) >= limit then return 0 end
local arg = 9
for i = 5, #KEYS do
    local n = tonumber(ARGV[arg])
    redis.call('HSET', KEYS[i], unpack(ARGV, arg + 1, arg + 2 * n))
    redis.call('EXPIRE', KEYS[i], ARGV[4])
    job_event(KEYS[i], KEYS[4], ARGV[8], 'queued', ARGV[7], {})
    arg = arg + 1 + 2 * n
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('LPUSH', KEYS[3], 1)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4]) end
return ARGV[5]
"""
)

#: Workers. KEYS: a job record, the event stream. ARGV: the record's TTL, the stream's length,
#: the event, now, the number of fields, the fields and values, then the event's own extra
#: field and value pairs. Changes the record and adds its event; answers the event's id.
RECORD_SCRIPT = (
    JOB_EVENT_LUA
    + """
local n = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + 2 * n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local extra = {}
for i = 6 + 2 * n, #ARGV do extra[#extra + 1] = ARGV[i] end
return job_event(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], extra)
"""
)

#: Workers. KEYS: the versions hash. ARGV: the model's name, a version number or '' for the
#: next. Allocates the next version of the model, or claims the one given if it is above every
#: version ever allocated (a folder dropped into a host's store); answers it, or 0.
ALLOCATE_VERSION_SCRIPT = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if ARGV[2] == '' then
    redis.call('HSET', KEYS[1], ARGV[1], last + 1)
    return last + 1
end
local wanted = tonumber(ARGV[2])
if wanted <= last then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], wanted)
return wanted
"""

#: API, workers. KEYS: an artifact's upload, the artifact. ARGV: the upload's TTL. The upload
#: becomes the artifact, expiring, unless the artifact exists already (it may be published:
#: then it must not start to expire); answers 1 if it did.
STORE_ARTIFACT_SCRIPT = """
if redis.call('RENAMENX', KEYS[1], KEYS[2]) == 1 then
    redis.call('EXPIRE', KEYS[2], ARGV[1])
    return 1
end
redis.call('DEL', KEYS[1])
return 0
"""

#: API. KEYS: the job record, Huey's revoke key for the task, the event stream. ARGV: now,
#: revoke value, ttl, the stream's length. Cancels a queued job; answers the status it found
#: (nil: no such job).
CANCEL_SCRIPT = (
    JOB_EVENT_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
    redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
    job_event(KEYS[1], KEYS[3], ARGV[4], 'cancelled', ARGV[1], {})
end
return status
"""
)

#: Workers. KEYS: the event stream, then job records; ARGV: now, ttl, the worker (host:pid),
#: the stream's length. Running, unless one of them was cancelled or has ended already (then
#: 0: a task queued again after its worker died may have finished meanwhile); answers each
#: record's creation time (for the queue wait). Atomic against CANCEL_SCRIPT.
START_SCRIPT = (
    JOB_EVENT_LUA
    + """
local ended = {cancelled = true, done = true, failed = true, expired = true}
for i = 2, #KEYS do
    if ended[redis.call('HGET', KEYS[i], 'status')] then return 0 end
end
local created = {}
for i = 2, #KEYS do
    redis.call('HSET', KEYS[i], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[3])
    redis.call('HINCRBY', KEYS[i], 'attempts', 1)
    redis.call('EXPIRE', KEYS[i], ARGV[2])
    created[#created + 1] = redis.call('HGET', KEYS[i], 'created_at') or ''
    job_event(KEYS[i], KEYS[1], ARGV[4], 'running', ARGV[1], {'worker', ARGV[3]})
end
return created
"""
)

#: Workers. KEYS: the queue, the leases. ARGV: the lease's expiry, the entry whose lease this
#: worker gives back ('' for none). The most urgent entry, now leased, or nil.
TAKE_SCRIPT = """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local popped = redis.call('ZPOPMIN', KEYS[1])
if #popped == 0 then return false end
redis.call('ZADD', KEYS[2], ARGV[1], popped[1])
return popped[1]
"""

#: Workers. KEYS: the leases, the queue, the doorbell. ARGV: the entry, its queue score, the
#: doorbell's length. Whoever removes the lease queues the entry; 0 if the lease was gone.
PUT_BACK_SCRIPT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('LPUSH', KEYS[3], 1)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return 1
"""

#: Workers. KEYS: the heartbeats, the event stream. ARGV: this worker's member, now, the time
#: before which a worker is gone, the stream's length. Beats; a worker new to the set and each
#: silent one dropped become `worker` events (joined, lost); one script: one reaper wins each.
BEAT_SCRIPT = """
local function worker_event(event, member, now)
    local worker = string.match(member, '^(.*)|') or member
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
               'type', 'worker', 'event', event, 'worker', worker, 'at', now)
end
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 1 then
    worker_event('joined', ARGV[1], ARGV[2])
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])) do
    redis.call('ZREM', KEYS[1], member)
    worker_event('lost', member, ARGV[2])
end
return 1
"""

#: Workers. KEYS: the heartbeats, the event stream. ARGV: this worker's member, now, the
#: stream's length. A worker stopping on purpose leaves the set, as a `left` event.
LEAVE_SCRIPT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
    local worker = string.match(ARGV[1], '^(.*)|') or ARGV[1]
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
               'type', 'worker', 'event', 'left', 'worker', worker, 'at', ARGV[2])
end
return 1
"""
