"""All configuration, in one typed object: config.toml, overridden by MARKETFLOW_* env vars.

Nested keys use a double underscore: ``MARKETFLOW_POSTGRES__DSN``, ``MARKETFLOW_HTTP__PORT``.
Nothing else in marketflow reads the environment: each adapter receives its own sub-model.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from marketflow.domain.archive import parse_duration
from marketflow.domain.errors import ConfigError
from marketflow.domain.ticks import MAX_PRICE

DEFAULT_PAIRS = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def is_loopback_address(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1), else False."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HttpSettings(_Frozen):
    """The REST API. Binds to loopback unless told otherwise: it has control endpoints
    (``POST /mode/*``), which take ``Authorization: Bearer <control_token>``. Without a token
    they answer loopback clients only, and the API must bind to loopback."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    control_token: SecretStr | None = None  # env MARKETFLOW_HTTP__CONTROL_TOKEN, never the TOML

    @field_validator("control_token")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HttpSettings:
        if self.control_token is None and not is_loopback_address(self.host):
            msg = (
                f"http.host {self.host!r} is not a loopback address and no http.control_token "
                "is set: anyone who reaches the API could switch the mode. Set "
                "MARKETFLOW_HTTP__CONTROL_TOKEN or bind http.host to 127.0.0.1"
            )
            raise ValueError(msg)
        return self


class PostgresSettings(_Frozen):
    """PostgreSQL for minute rows. Empty dsn: use the embedded SQLite file."""

    dsn: str = ""
    password: SecretStr | None = None  # kept out of the dsn so it can come from the env only
    # Long enough for a server that is up but loaded (a refused connection fails at once): a
    # stall of a few seconds must not send the daemon to the embedded store.
    connect_timeout_s: float = Field(10.0, gt=0)
    # When PostgreSQL is configured but unreachable at start: "embedded" falls back to SQLite,
    # "wait" keeps retrying (for a service started before its database).
    unreachable_at_start: Literal["embedded", "wait"] = "embedded"


class RedisSettings(_Frozen):
    """Redis for latest prices and the per-second window. Empty url: in-process cache."""

    url: str = ""
    password: SecretStr | None = None
    connect_timeout_s: float = Field(2.0, gt=0)
    unreachable_at_start: Literal["embedded", "wait"] = "embedded"


class EmbeddedSettings(_Frozen):
    """Where the embedded fallbacks keep their files."""

    data_dir: Path = Path("var")


class ExchangeSettings(_Frozen):
    """One live source. ``type = "tcp"``: a venue's feed, newline JSON (``protocol = "json"``)
    or FIX 4.4 (``protocol = "fix"``, we are the initiator). ``type = "file"``: a FIX log or
    JSONL tick capture replayed at start, ``speed`` times the original pace (0 = as fast as
    possible). ``protocol = "websocket"``: a Binance-style combined-stream WebSocket venue
    (``ws_path``, ``tls``, ``ws_subscribe``; README "WebSocket venues")."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["tcp", "file"] = "tcp"
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    protocol: Literal["json", "fix", "websocket"] = "json"
    sender_comp_id: str = "MARKETFLOW"
    target_comp_id: str = ""  # empty: the venue name upper-cased
    heartbeat_s: int = Field(30, ge=1, le=3600)
    # FIX session recovery (QuickFIX's ResetOnLogon; QuickFIX/J's ResendRequestChunkSize).
    reset_on_logon: bool = False  # Logon with 141=Y: what the venue sent meanwhile is lost
    resend_chunk_size: int = Field(5000, ge=0)  # MsgSeqNums per ResendRequest; 0: one request
    resend_timeout_s: float = Field(10.0, gt=0)  # a gap unfilled this long: re-subscribe
    path: Path | None = None
    speed: float = Field(1.0, ge=0)
    # FIX MarketDepth (264) asked for in the subscription: 1 = top of book (the lean parser),
    # N > 1 = N price levels a side with sizes, for the world view's merged book.
    market_depth: int = Field(1, ge=1, le=100)
    # WebSocket venues (protocol = "websocket"): ws[s]://host:port<ws_path>, combined streams.
    ws_path: str = Field("/stream", pattern=r"^/[A-Za-z0-9_./-]*$")
    tls: bool = False  # wss:// with certificate verification
    # "url": the streams in the query (?streams=a@trade/b@bookTicker); "message": connect
    # bare and send {"method":"SUBSCRIBE"} after each connect. Both re-subscribe on reconnect.
    ws_subscribe: Literal["url", "message"] = "url"

    @field_validator("name")
    @classmethod
    def _not_test_name(cls, value: str) -> str:
        if value.startswith("test-"):
            msg = "live exchange names must not start with 'test-' (reserved for test mode)"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _complete(self) -> ExchangeSettings:
        if self.type == "tcp" and self.port == 0:
            msg = f"exchange {self.name}: a tcp source needs a port"
            raise ValueError(msg)
        if self.type == "file" and self.path is None:
            msg = f"exchange {self.name}: a file source needs a path"
            raise ValueError(msg)
        return self


class CaptureFilter(_Frozen):
    """Keep (``include``) or drop (``exclude``) messages whose ``tag`` has one of ``values``."""

    tag: int = Field(ge=1)
    values: tuple[str, ...]
    action: Literal["include", "exclude"] = "include"


class CaptureSettings(_Frozen):
    """The FIX capture listener (audit trail). Loopback by default."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9876, ge=0, le=65535)
    filters: tuple[CaptureFilter, ...] = ()
    batch_max: int = Field(5000, ge=1)
    flush_interval_ms: int = Field(50, ge=1)
    max_message_bytes: int = Field(65536, ge=256)
    # Connections above this are closed at once (counted as connections_refused).
    max_connections: int = Field(256, ge=1, le=100_000)
    # A peer silent this long is disconnected (counted as idle_closed).
    idle_timeout_s: float = Field(300.0, gt=0)
    # -- Kafka (issue 14): raw FIX read from this topic into the audit trail ("": none)
    kafka_source_topic: str = ""


class PipelineSettings(_Frozen):
    """Queue sizes, worker pools and timings of the ingest pipeline."""

    workers_per_source: int = Field(5, ge=1, le=64)
    # Parsing per event-loop pass, across every source's workers: once this much time has
    # gone since a pass's first parse, the next worker waits for a later pass (a 64 KiB chunk
    # takes ~1 ms). The loop reaches sockets, HTTP requests and the flusher between passes,
    # so a burst backlog cannot hold it for workers x sources chunks. 0: no bound.
    parse_pass_budget_ms: float = Field(1.0, ge=0, le=1000)
    # Chunks of read_chunk_bytes per source (a grown read takes as many as its size): the
    # backpressure point. The fan-in holds batches of up to 1,024 ticks each (a bigger
    # batch takes one per 1,024): what queues is bounded in bytes and ticks, not items.
    source_queue_chunks: int = Field(64, ge=1)
    fanin_queue_batches: int = Field(1024, ge=1)
    read_chunk_bytes: int = Field(65536, ge=1024)
    # A JSON feed whose reads come back full (the daemon is behind: saturated, or catching
    # up after a reconnect) reads twice as much next time, up to this; a read that does not
    # fill returns it to read_chunk_bytes. Bigger chunks fold more ticks per (pair, second)
    # bucket in the parser (which decodes a grown read 64 KiB at a time): with 500 pairs x
    # 10 exchanges saturated, 524288 sustains ~1.8x what 262144 does, 4 MiB more still
    # but with 4 GB of backlog; with a handful of pairs it gains nothing and buffers more.
    # 0 (the default): 8 x read_chunk_bytes for a feed of AUTO_GROWTH_PAIRS pairs or more,
    # else no growth.
    read_chunk_max_bytes: int = Field(0, ge=0)
    max_line_bytes: int = Field(65536, ge=256)
    # Cache flushes: as soon as the loop is idle, at most one per flush_min_interval_ms, and
    # at least one per flush_interval_ms (the ceiling of the crash-loss bound).
    flush_interval_ms: int = Field(20, ge=5, le=10_000)
    flush_min_interval_ms: int = Field(1, ge=0, le=1_000)
    minute_grace_ms: int = Field(2000, ge=0, le=60_000)
    window_retention_s: int = Field(600, ge=300, le=86_400)  # >= 5 minutes of seconds
    stale_after_s: float = Field(5.0, gt=0)  # connected but silent this long: reconnect
    reconnect_initial_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    spill_max_rows_in_memory: int = Field(100_000, ge=1)
    # Allocations between two young-generation GC runs; 0 keeps CPython's defaults (700, 10,
    # 10). Raised, the collector runs ~70x less often for a somewhat longer pause each
    # (README "Measured figures": bench.api measures both).
    gc_gen0_threshold: int = Field(50_000, ge=0, le=10_000_000)
    # Young and middle GC generations collected on this clock too (loop_health.
    # YoungCollections); 0: CPython's allocation count alone, which frees of old objects
    # hold back (young collections of 30-600 ms at 500 pairs x 10 exchanges).
    gc_young_every_ms: int = Field(100, ge=0, le=60_000)
    # A loop held this long logs where it is held (loop_held, with the stack); 0: off.
    loop_stall_log_ms: int = Field(0, ge=0, le=60_000)
    # A price above this is counted as price_out_of_range. Capped so that no sum of prices
    # (of any number of ticks a process could see) can overflow a float to inf.
    max_price: float = Field(MAX_PRICE, gt=0, le=1e18)


class WorldViewSettings(_Frozen):
    """The cross-venue world view (GET /bbo, GET /book): combined best bid/offer and book."""

    # A venue whose quote is older than this leaves the view until it quotes again; 0: off
    # (FIX venues send only on change: an old quote there is not a stale one).
    max_quote_age_ms: int = Field(0, ge=0, le=86_400_000)
    max_depth: int = Field(10, ge=1, le=100)  # levels kept per venue and side; GET /book's cap


class FixServerSettings(_Frozen):
    """The FIX market-data server for downstream consumers (FIX 4.4 acceptor): the world
    view's best bid/offer and merged book as 35=W / 35=X. Loopback by default; only the
    SenderCompIDs in ``allowed_comp_ids`` may log on. Off by default (a fixed port)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9878, ge=0, le=65535)
    comp_id: str = Field("MARKETFLOW", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    allowed_comp_ids: tuple[str, ...] = ()
    max_sessions: int = Field(16, ge=1, le=10_000)
    heartbeat_min_s: int = Field(1, ge=1, le=3600)  # a Logon's HeartBtInt (108) must be within
    heartbeat_max_s: int = Field(300, ge=1, le=3600)
    cadence_ms: int = Field(100, ge=1, le=10_000)  # coalesced updates: one flush per cadence
    logon_timeout_s: float = Field(10.0, gt=0)  # a connection without a Logon is closed
    logout_timeout_s: float = Field(2.0, gt=0)  # our Logout unanswered this long: close
    max_buffer_bytes: int = Field(4 * 1024 * 1024, ge=65536)  # a consumer this far behind: cut

    @field_validator("allowed_comp_ids")
    @classmethod
    def _comp_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not v or "\x01" in v or "/" in v or v.startswith(".") for v in value):
            msg = "allowed_comp_ids must be non-empty CompIDs (no SOH, '/', leading '.')"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> FixServerSettings:
        if self.heartbeat_min_s > self.heartbeat_max_s:
            raise ValueError("fix_server.heartbeat_min_s is above heartbeat_max_s")
        return self


class TestModeSettings(_Frozen):
    """The synthetic generator used in test mode."""

    sources: int = Field(3, ge=1, le=16)  # named test-exchange1 .. test-exchangeN
    interval_ms: int = Field(100, ge=1)  # one line per pair per interval per source
    seed: int | None = None


class StreamSettings(_Frozen):
    """``GET /stream`` (WebSocket) and ``GET /stream/sse``: the stream hub's cadence and caps.

    Updates are coalesced: at most one frame per subscribed channel per client every
    ``1 / cadence_hz`` seconds, whatever the tick rate. A client that falls more than
    ``max_buffered_bytes`` behind (bytes its socket has not taken plus updates queued for it
    since it last caught up) is closed with 1008; before that its updates are conflated.
    The kernel send buffer of each stream connection is capped at half of it, so a client
    that stops reading shows within about that many bytes."""

    cadence_hz: float = Field(10.0, gt=0, le=1000)
    max_connections: int = Field(2000, ge=1, le=100_000)  # WebSocket + SSE; more: 503
    max_subscriptions: int = Field(256, ge=1, le=100_000)  # (channel, symbol) per connection
    max_buffered_bytes: int = Field(1_048_576, ge=1024)
    heartbeat_s: float = Field(30.0, gt=0, le=3600)  # WebSocket ping; no pong: closed
    sse_keepalive_s: float = Field(15.0, gt=0, le=3600)  # SSE comment when nothing was sent
    # Origins (scheme://host[:port]) allowed besides the daemon's own host and no Origin at
    # all (curl, bots); "*" allows any. Others get 403 before the upgrade.
    allowed_origins: tuple[str, ...] = ()
    book_depth: int = Field(10, ge=1, le=1000)  # levels per side on the book channel


class NodeSettings(_Frozen):
    """This process in a multi-node deployment: its name (in diagnostics, Kafka client ids
    and group membership) and its role. ``all`` is the single process and needs no Kafka;
    ``ingest`` reads feeds and publishes ticks to Kafka; ``aggregate`` consumes them, builds
    windows, books and minute rows and serves the API (``--role`` sets it too)."""

    id: str = Field("", max_length=128, pattern=r"^[A-Za-z0-9_.-]*$")  # empty: the hostname
    role: Literal["all", "ingest", "aggregate"] = "all"


class KafkaSettings(_Frozen):
    """Apache Kafka between ingest and aggregate nodes. Empty ``bootstrap_servers``: not used
    (the ``all`` role); the ``ingest`` and ``aggregate`` roles require it. The password comes
    from the env (MARKETFLOW_KAFKA__SASL_PASSWORD), never the TOML."""

    bootstrap_servers: str = ""  # "host1:9092,host2:9092"
    client_id: str = "marketflow"
    ticks_topic: str = "marketflow.ticks"
    ticks_partitions: int = Field(12, ge=1, le=10_000)  # created with this many if missing
    status_topic: str = "marketflow.feed-status"
    feeds_topic: str = "marketflow.feeds"  # control topic: one partition per configured feed
    dead_letter_topic: str = "marketflow.dead-letter"
    capture_topic: str = "marketflow.fix-capture"
    replication_factor: int = Field(1, ge=1, le=16)
    aggregate_group: str = "marketflow-aggregate"
    feeds_group: str = "marketflow-feeds"
    compression: Literal["none", "gzip", "lz4"] = "lz4"
    linger_ms: int = Field(5, ge=0, le=10_000)
    max_batch_bytes: int = Field(1_048_576, ge=16_384)
    session_timeout_ms: int = Field(10_000, ge=500, le=600_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=60_000)
    request_timeout_ms: int = Field(15_000, ge=1_000, le=600_000)
    hold_back_max_records: int = Field(100_000, ge=1)  # broker down: buffered, then spilled
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # -- the aggregate role (issue 14)
    # Tests only: "exit_after_flush_before_commit" makes an aggregate node exit right after a
    # flush wrote its marks to Redis, before Kafka's offsets are committed (a crash there).
    test_fault: Literal["none", "exit_after_flush_before_commit"] = "none"
    # -- ingest role (issue 14): spill beyond the hold-back, status heartbeats, FIX resume
    spill_max_records: int = Field(5_000_000, ge=0)  # on disk; beyond it the feeds wait
    status_interval_ms: int = Field(1_000, ge=100, le=60_000)  # feed status heartbeat
    mark_interval_ms: int = Field(1_000, ge=50, le=60_000)  # resume marks to the feeds topic
    fix_out_seq_margin: int = Field(1_000, ge=0)  # a FIX feed moved: skip ahead our MsgSeqNum

    @model_validator(mode="after")
    def _timings(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                "kafka.heartbeat_interval_ms must be at most a third of session_timeout_ms"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.bootstrap_servers.strip())


class ArchiveSettings(_Frozen):
    """The Parquet archive of old minute and FIX audit rows (README "Archive"). ``dir`` is
    shared by every node (a shared filesystem path): each node's history queries read the
    archived days from it, and the scheduled run (``enabled``) archives into it."""

    enabled: bool = False  # a scheduled run every ``interval`` (one node at a time: a lock)
    dir: Path = Path("var/archive")
    older_than: str = "7d"  # whole UTC days ending before now - older_than
    interval: str = "1h"

    @field_validator("older_than", "interval")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class Settings(BaseSettings):
    """The whole configuration; see config.toml for every key with its default."""

    model_config = SettingsConfigDict(
        env_prefix="MARKETFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    mode: Literal["live", "test"] = "live"
    pairs: tuple[str, ...] = DEFAULT_PAIRS
    log_format: Literal["kv", "json"] = "kv"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    http: HttpSettings = HttpSettings()
    postgres: PostgresSettings = PostgresSettings()
    redis: RedisSettings = RedisSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    pipeline: PipelineSettings = PipelineSettings()
    test_mode: TestModeSettings = TestModeSettings()
    capture: CaptureSettings = CaptureSettings()
    world_view: WorldViewSettings = WorldViewSettings()
    fix_server: FixServerSettings = FixServerSettings()
    stream: StreamSettings = StreamSettings()
    node: NodeSettings = NodeSettings()
    kafka: KafkaSettings = KafkaSettings()
    archive: ArchiveSettings = ArchiveSettings()
    exchanges: tuple[ExchangeSettings, ...] = (
        ExchangeSettings(name="exchange1", port=40101),
        ExchangeSettings(name="exchange2", port=40102),
        ExchangeSettings(name="exchange3", port=40103),
    )

    @field_validator("exchanges")
    @classmethod
    def _unique_names(cls, value: tuple[ExchangeSettings, ...]) -> tuple[ExchangeSettings, ...]:
        names = [e.name for e in value]
        if len(set(names)) != len(names):
            msg = f"exchange names must be unique, got {names}"
            raise ValueError(msg)
        return value

    @field_validator("pairs")
    @classmethod
    def _pairs_upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not p.isalnum() or p.upper() != p for p in value):
            msg = "pairs must be non-empty upper-case alphanumeric symbols"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _role_needs_kafka(self) -> Settings:
        if self.node.role != "all" and not self.kafka.enabled:
            msg = f"node.role {self.node.role!r} needs kafka.bootstrap_servers"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _aggregate_needs_stores(self) -> Settings:
        # An aggregate node shares its state with the others through PostgreSQL and Redis:
        # an embedded store would be a private copy nobody else reads.
        if self.node.role == "aggregate" and not (self.postgres.dsn and self.redis.url):
            msg = "node.role 'aggregate' needs postgres.dsn and redis.url (no embedded stores)"
            raise ValueError(msg)
        return self

    def test_source_names(self) -> tuple[str, ...]:
        return tuple(f"test-exchange{i}" for i in range(1, self.test_mode.sources + 1))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then env vars, then the TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _TOML_PATH is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_TOML_PATH))
        return tuple(sources)


_TOML_PATH: Path | None = None


def load_settings(path: Path | None, **overrides: object) -> Settings:
    """Read ``path`` (TOML) under the env vars; raise ConfigError with one readable line."""
    global _TOML_PATH  # pydantic-settings takes its sources from the class
    if path is not None and not path.is_file():
        msg = f"config file {path} is not a readable file"
        raise ConfigError(msg)
    _TOML_PATH = path
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        text = first["msg"].removeprefix("Value error, ")
        msg = f"config error at {where or 'top level'}: {text}"
        raise ConfigError(msg) from exc
    except (OSError, ValueError) as exc:  # a TOML syntax error is a ValueError
        msg = f"cannot read config {path}: {exc}"
        raise ConfigError(msg) from exc
    finally:
        _TOML_PATH = None
