"""The API process's services, built when the app starts and closed when it stops.

Routes (main.py) reach them through `Services`; the answer cache's middleware finds them on
`app.state.services`. Building them connects to nothing; `running` opens the Redis
connections and starts the three background tasks (the model catalog's follower, the result
listener and the event feed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from huey import Huey
from huey.api import TaskWrapper
from redis import RedisError

from hueyserve.api.activity import WINDOW_S, Activity
from hueyserve.api.answers import AnswerCache
from hueyserve.api.catalog import ModelCatalog
from hueyserve.api.events import READ_BLOCK_MS, EventFeed
from hueyserve.api.health import HealthService
from hueyserve.api.imports import ModelAdmin
from hueyserve.api.inference import InferenceService
from hueyserve.api.jobs import JobService
from hueyserve.api.queue import TaskQueue
from hueyserve.api.streams import Streams
from hueyserve.cache import PredictionCache
from hueyserve.errors import ServiceError
from hueyserve.settings import Settings


@dataclass(frozen=True)
class Tasks:
    """The Huey tasks the API enqueues; core.py defines them (hueyserve never imports core)."""

    predict: TaskWrapper
    train: TaskWrapper
    reload: TaskWrapper
    import_: TaskWrapper
    delete: TaskWrapper


@dataclass(frozen=True)
class Services:
    settings: Settings
    queue: TaskQueue
    catalog: ModelCatalog
    inference: InferenceService
    jobs: JobService
    admin: ModelAdmin
    health: HealthService
    answers: AnswerCache
    feed: EventFeed
    streams: Streams
    activity: Activity

    @classmethod
    def build(cls, settings: Settings, huey: Huey, tasks: Tasks) -> Services:
        queue = TaskQueue(
            huey,
            url=settings.redis_url,
            connect_timeout_s=settings.redis_connect_timeout_s,
            socket_timeout_s=settings.redis_socket_timeout_s,
            record_ttl_s=settings.result_ttl_s,
            max_waiters=settings.max_sync_waiters,
            max_connections=settings.redis_max_connections,
            pool_timeout_s=settings.redis_pool_timeout_s,
            max_depth=settings.max_queue_depth,
            events_max_len=settings.events_max_len,
        )
        catalog = ModelCatalog(queue.client, resync_s=settings.catalog_resync_s)
        cache = PredictionCache(settings.cache_size, where="api")
        jobs = JobService(
            settings=settings,
            queue=queue,
            catalog=catalog,
            predict_task=tasks.predict,
            train_task=tasks.train,
            reload_task=tasks.reload,
        )
        # The feed's reader blocks in XREAD for READ_BLOCK_MS: its read timeout is longer.
        reader = aioredis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_connect_timeout_s,
            socket_timeout=READ_BLOCK_MS / 1000 + 5,
            socket_keepalive=True,
        )
        feed = EventFeed(queue.client, reader, backfill_s=WINDOW_S)
        activity = Activity()
        feed.listeners.append(activity.observe)
        return cls(
            settings=settings,
            queue=queue,
            catalog=catalog,
            inference=InferenceService(
                settings=settings, queue=queue, cache=cache, predict_task=tasks.predict
            ),
            jobs=jobs,
            admin=ModelAdmin(
                settings=settings,
                queue=queue,
                catalog=catalog,
                jobs=jobs,
                import_task=tasks.import_,
                delete_task=tasks.delete,
            ),  # fmt: skip
            health=HealthService(settings=settings, queue=queue, catalog=catalog, cache=cache),
            answers=AnswerCache(cache, catalog),
            feed=feed,
            streams=Streams(feed, jobs, settings.events_keepalive_s),
            activity=activity,
        )


@contextlib.asynccontextmanager
async def running(settings: Settings, huey: Huey, tasks: Tasks) -> AsyncIterator[Services]:
    """The services, connected, for as long as the app runs."""
    services = Services.build(settings, huey, tasks)
    queue, catalog = services.queue, services.catalog
    with contextlib.suppress(ServiceError, RedisError, OSError):
        await queue.warm()
        await catalog.resync()  # answer the first request with models known; else follow() retries
    background = {
        asyncio.create_task(catalog.follow(), name="model-catalog"),
        asyncio.create_task(queue.results.run(), name="result-listener"),
        asyncio.create_task(services.feed.run(), name="event-feed"),
    }
    with contextlib.suppress(TimeoutError):  # Redis down: requests get 503s until it is back
        await asyncio.wait_for(
            asyncio.gather(queue.results.connected.wait(), services.feed.connected.wait()),
            timeout=2.0,
        )
    try:
        yield services
    finally:
        for task in background:
            task.cancel()
        # Bounded: shutdown must never hang on a Redis call that swallowed the cancellation.
        await asyncio.wait(background, timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.aclose(), timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(services.feed.reader.aclose(), timeout=2.0)
