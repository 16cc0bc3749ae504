"""The failed-token limit shared by two routers through a real redis-server, and its fallback."""

from __future__ import annotations

import pytest
import pytest_twisted

from dcrouter.api.auth import TokenAuthenticator
from dcrouter.api.authshare import SharedFailureLimiter
from dcrouter.api.errors import ApiError
from tests.api.support import TOKEN, Client, assert_error, router_config
from tests.queue.helpers import redis_server
from tests.support.net import free_port
from tests.support.router import options_from, start_router, stop_router


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


def start_node(state_dir: str, redis_url: str, limit: int):
    data, _ = router_config(state_dir, max_auth_failures_per_minute=limit)
    data["email"]["queue"].update(storage_type="redis", redis_url=redis_url,
                                  redis_prefix="authshare")
    router = start_router(options_from(data, state_dir))
    return router, Client(router.by_name["api"].listeners.port_for("api.port"))


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_the_failure_limit(tmp_path, redis_url):
    a, client_a = start_node(str(tmp_path / "a"), redis_url, limit=3)
    b, client_b = start_node(str(tmp_path / "b"), redis_url, limit=3)
    try:
        assert a.by_name["api"].get_stats()["auth_limit_shared"] is True
        assert (await client_a.get("/api/status")).status == 200
        for _ in range(2):
            assert_error(await client_a.get("/api/status", token="guess"), 401, "unauthorized")
        # one more guess on the other node reaches the limit of 3 for this address...
        assert_error(await client_b.get("/api/status", token="guess"), 401, "unauthorized")
        # ...so both nodes now refuse it, even with the right token, though neither saw 3
        for client in (client_a, client_b):
            response = await client.get("/api/status")
            assert_error(response, 429, "too_many_requests")
            assert 1 <= int(response.header("Retry-After")) <= 60
        assert b.by_name["api"].get_stats()["auth_rate_limited"] == 1
        # the failures are in Redis with an expiry, keyed by the address
        redis = a.email.queue.store.redis
        ttl = await redis.ttl("authshare:api:authfail:127.0.0.1")
        assert 0 < int(ttl) <= 61
        assert int(await redis.zcard("authshare:api:authfail:127.0.0.1")) == 3
    finally:
        await stop_router(a)
        await stop_router(b)


@pytest_twisted.ensureDeferred
async def test_without_redis_the_local_limit_still_applies():
    shared = SharedFailureLimiter(f"redis://127.0.0.1:{free_port()}/0", "down", 2,
                                  timeout=2.0)
    auth = TokenAuthenticator(TOKEN, 2, shared=shared)
    try:
        for _ in range(2):
            with pytest.raises(ApiError) as caught:
                await auth.verify(b"Bearer wrong", "192.0.2.7", "/api/status")
            assert caught.value.status == 401
        with pytest.raises(ApiError) as caught:
            await auth.verify(("Bearer " + TOKEN).encode(), "192.0.2.7", "/api/status")
        assert caught.value.status == 429
        assert shared.errors == 1, "one failed connection; Redis is retried only later"
        await auth.verify(("Bearer " + TOKEN).encode(), "192.0.2.8", "/api/status")
    finally:
        await shared.close()
