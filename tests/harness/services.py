"""Real PostgreSQL, Redis and Apache Kafka server processes for integration and fault tests.

Each server lives in its own temporary directory on a free loopback port, started from the
locally installed binaries (``make server-binaries`` installs them). ``stop()`` and
``restart()`` keep the port and the data, so a test can take a service away mid-run and give
it back. PostgreSQL refuses to run as root: under euid 0 it runs as the ``postgres`` system
user (or ``nobody``) through ``setpriv``, with its directory chowned to that user.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class ServerBinaryMissing(RuntimeError):
    """A server binary the integration tests need is not installed."""


_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1 ... under pytest -n
_PORTS_PER_WORKER = 2500
_PORT_BASE = 10_000  # below Linux's ephemeral range (32768-60999): no client socket holds one


def free_port() -> int:
    """A loopback TCP port nobody listens on right now.

    Under pytest-xdist each worker draws from its own range, so two workers never pick the
    same free port between a check and a bind; alone, the kernel picks one."""
    if not _WORKER.startswith("gw"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port
    low = _PORT_BASE + int(_WORKER[2:]) % 9 * _PORTS_PER_WORKER
    for _ in range(1000):
        candidate = random.randrange(low, low + _PORTS_PER_WORKER)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free port in {low}..{low + _PORTS_PER_WORKER}")


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,): the newest installed major version wins.
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name))


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (PATH first, then Debian's layout)."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        bin_dir = Path(on_path).resolve().parent
        if (bin_dir / "postgres").exists():
            return bin_dir
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=_version_key,
        reverse=True,
    )
    if candidates:
        return candidates[0]
    raise ServerBinaryMissing(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin: run `make server-binaries` (scripts/ensure-servers.sh)"
    )


def find_redis_server() -> Path:
    """The ``redis-server`` binary."""
    found = shutil.which("redis-server")
    if found is None:
        raise ServerBinaryMissing(
            "redis-server not found on PATH: run `make server-binaries` (scripts/ensure-servers.sh)"
        )
    return Path(found)


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerBinaryMissing("running as root and neither a 'postgres' nor 'nobody' user exists")


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


class _Server:
    """Shared process handling: one child process, a log file, a temp directory."""

    name = "server"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"marketflow-{self.name}-"))
        self.port = free_port()
        self.log_path = self.dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_once = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        if self._log is None:
            self._log = self.log_path.open("ab")
        # A new session: a Ctrl-C aimed at pytest must not reach the server before the
        # fixtures stop it in order.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _launch(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server on ``self.port`` and wait until it accepts connections."""
        if self.running:
            return
        if self._started_once:
            self._start_once()  # a restart must keep its port: clients reconnect to it
            return
        # Another process may grab the free port between choosing and binding it: retry on a
        # new port, but only before anyone was told this one.
        for attempt in range(3):
            try:
                self._start_once()
            except RuntimeError:
                if attempt == 2:
                    raise
                self.port = free_port()
            else:
                break
        self._started_once = True

    def _start_once(self) -> None:
        self._proc = self._launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(
                    f"{self.name} on port {self.port} exited at start:\n{_tail(self.log_path)}"
                )
            if self._is_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} not ready in {START_TIMEOUT_S}s")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server stalled (SIGSTOP .. SIGCONT): connections stay open and unanswered, as
        a starved or swapping server's do, and its state is kept."""
        assert self._proc is not None, f"{self.name} is not running"
        os.kill(self._proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self._proc.pid, signal.SIGCONT)

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGTERM

    def stop(self) -> None:
        """Stop the server quickly (data directory and port are kept for ``start()``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self._stop_signal())
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop, then start again on the same port with the same data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and delete the temporary directory."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster (trust auth on loopback, fsync off: tests only).

    ``durable=True`` keeps PostgreSQL's default durability (fsync, synchronous_commit and
    full_page_writes on): what a benchmark of stored rows must run under.
    """

    name = "postgres"

    def __init__(self, *, durable: bool = False) -> None:
        self._durable = durable
        self.bin_dir = find_postgres_bin()
        self._user = _unprivileged_user()
        super().__init__()
        self.data_dir = self.dir / "data"
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._initdb()

    def _as_user(self, argv: list[str]) -> list[str]:
        if self._user is None:
            return argv
        # setpriv execs in place (no intermediate process), so signals reach the postmaster.
        return [
            "setpriv",
            f"--reuid={self._user.pw_uid}",
            f"--regid={self._user.pw_gid}",
            "--clear-groups",
            "--",
            *argv,
        ]

    def _initdb(self) -> None:
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        done = subprocess.run(self._as_user(argv), capture_output=True, check=False, cwd=self.dir)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{out}")

    def _launch(self) -> subprocess.Popen[bytes]:
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.dir),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        if not self._durable:
            # Durability is irrelevant for throwaway data and costs seconds per test.
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]
        return self._spawn(self._as_user(argv))

    def _is_ready(self) -> bool:
        # Line 8 of postmaster.pid is the postmaster's status; "ready" once it accepts
        # connections (PostgreSQL 10+). No client process needed.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGINT  # "fast" shutdown: roll back sessions, exit promptly

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """DSN of the ``postgres`` maintenance database."""
        return self.dsn_for("postgres")


class RedisServer(_Server):
    """A throwaway Redis without persistence: a restart empties it, like a real crash."""

    name = "redis"

    def __init__(self) -> None:
        self.binary = find_redis_server()
        super().__init__()

    def _launch(self) -> subprocess.Popen[bytes]:
        argv = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
        ]
        return self._spawn(argv)

    def _is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


_REPO = Path(__file__).resolve().parents[2]


def find_kafka_libs() -> Path:
    """The directory of Kafka's jars (``scripts/ensure-kafka.sh`` fetches them once with Maven
    and prints the cached directory; a cached run takes milliseconds)."""
    if shutil.which("java") is None:
        raise ServerBinaryMissing(
            "java not found: Kafka needs a JDK 17+ (apt-get install default-jdk)"
        )
    done = subprocess.run(
        ["bash", str(_REPO / "scripts" / "ensure-kafka.sh")],
        capture_output=True,
        check=False,
        text=True,
    )
    if done.returncode != 0:
        raise ServerBinaryMissing(f"scripts/ensure-kafka.sh failed:\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


_KAFKA_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.noisy.name = org.apache.kafka.coordinator
logger.noisy.level = warn
"""


class KafkaServer(_Server):
    """A single-node Apache Kafka in KRaft mode (combined broker and controller) on two free
    loopback ports, storage formatted once with a random cluster id.

    ``stop()`` is a controlled shutdown (SIGTERM), ``kill()`` a crash (SIGKILL); both keep the
    log directory, so ``start()`` brings the same topics, records and committed offsets back on
    the same port. Group timings are short so rebalances in tests take about a second.
    """

    name = "kafka"

    def __init__(self, *, partitions: int = 4) -> None:
        self.libs = find_kafka_libs()
        self._partitions = partitions
        super().__init__()
        self.controller_port = free_port()
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "server.properties"
        (self.dir / "log4j2.properties").write_text(_KAFKA_LOG4J)
        self._formatted = False
        self._log_offset = 0

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xms64m",
            "-Xmx512m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # starts in ~3 s instead of ~6 on 2 cores
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _write_config(self) -> None:
        port, ctl = self.port, self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{ctl}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctl}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self._partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "500",
            "group.consumer.min.session.timeout.ms": "500",
            "group.consumer.min.heartbeat.interval.ms": "100",
            "log.flush.interval.messages": "9223372036854775807",
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _format(self) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        argv = self._java(
            "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config_path)
        )
        done = subprocess.run(argv, capture_output=True, check=False, cwd=self.dir)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"kafka storage format failed ({done.returncode}):\n{out}")
        self._formatted = True

    def _launch(self) -> subprocess.Popen[bytes]:
        self._write_config()  # the port may have changed on a retry
        if not self._formatted:
            self._format()
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0
        return self._spawn(self._java("kafka.Kafka", str(self.config_path)))

    def _is_ready(self) -> bool:
        # The broker logs this once it serves requests (a bound port alone comes earlier).
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return b"Kafka Server started" in f.read()
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash (no controlled shutdown, nothing flushed beyond the page cache)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"
