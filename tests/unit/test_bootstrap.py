from marketflow.bootstrap import _host_of, _open_configured
from marketflow.domain.errors import StoreUnavailable


async def test_unreachable_service_falls_back_when_policy_is_embedded() -> None:
    calls = 0

    async def opener() -> str:
        nonlocal calls
        calls += 1
        raise StoreUnavailable("connection refused")

    assert (
        await _open_configured("postgres", "postgresql://u:pw@db:5432/x", "embedded", opener)
        is None
    )
    assert calls == 1


async def test_unreachable_service_is_retried_until_it_answers_when_policy_is_wait() -> None:
    calls = 0

    async def opener() -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise StoreUnavailable("connection refused")
        return "store"

    assert await _open_configured("postgres", "postgresql://db/x", "wait", opener) == "store"
    assert calls == 2


def test_logged_host_never_carries_credentials() -> None:
    assert _host_of("postgresql://user:secret@db.example:5432/marketflow") == "db.example:5432"
    assert _host_of("redis://:secret@cache:6379/0") == "cache:6379"
