"""The project's own exceptions: adapters translate driver errors into these at their boundary."""


class MarketflowError(Exception):
    """Base of every marketflow error."""


class StoreUnavailable(MarketflowError):
    """The minute store cannot be reached now; the write may be retried later."""


class CacheUnavailable(MarketflowError):
    """The price cache cannot be reached now; the daemon answers from memory meanwhile."""


class BadRequest(MarketflowError):
    """User input to the API is malformed (answered with 400)."""


class NotFound(MarketflowError):
    """The API has nothing for the request (answered with 404)."""


class ConfigError(MarketflowError):
    """The configuration cannot be used; the daemon refuses to start."""
