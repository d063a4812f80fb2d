"""The deployment files say what the code does: docker-compose.yml, Dockerfile, the systemd unit.

No Docker engine and no running systemd here: the compose file is validated against the
Compose Specification's JSON schema (vendored, see README.md), its commands, ports and
MARKETFLOW_* names against the code; the unit with ``systemd-analyze verify``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from marketflow.devstack import SIMULATORS
from marketflow.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE = ROOT / "docker-compose.yml"
UNIT = ROOT / "deploy" / "marketflow.service"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = "/etc/marketflow/config.toml"  # where the Dockerfile puts config.toml
TEST_ENV = {
    "POSTGRES_PASSWORD": "pw",
    "MARKETFLOW_CONTROL_TOKEN": "compose-test-token",
    "GRAFANA_ADMIN_PASSWORD": "grafana-test-password",
}


# -- compose interpolation (the subset of the spec this file uses, strictly) -----------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op is not None and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return value or ""

    return _VAR.sub(one, text)


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    return node


def compose(env: Mapping[str, str] = TEST_ENV) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(raw, dict)
    return dict(_walk(raw, env))


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((HERE / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in
            validator.iter_errors(doc)]  # fmt: skip


def test_compose_file_follows_the_compose_specification() -> None:
    assert _schema_errors(yaml.safe_load(COMPOSE.read_text())) == []
    assert _schema_errors(compose()) == []


def test_the_schema_check_can_fail() -> None:
    doc = compose()
    doc["services"]["marketflow"]["restart_policy"] = "always"  # not a compose key
    doc["services"]["redis"]["ports"] = "6379"  # must be a list

    errors = _schema_errors(doc)

    assert any("restart_policy" in e for e in errors)
    assert any(e.startswith("services/redis/ports") for e in errors)


def test_compose_needs_the_control_token_from_the_environment() -> None:
    with pytest.raises(KeyError, match="MARKETFLOW_CONTROL_TOKEN"):
        compose({"POSTGRES_PASSWORD": "pw"})


# -- MARKETFLOW_* names are Settings fields ----------------------------------------------------


def settings_path(env_name: str) -> list[str]:
    """``MARKETFLOW_HTTP__CONTROL_TOKEN`` -> ["http", "control_token"], or AssertionError when
    no Settings field has that name (pydantic-settings would silently ignore it)."""
    assert env_name.startswith("MARKETFLOW_"), env_name
    model: type[BaseModel] | None = Settings
    path = env_name.removeprefix("MARKETFLOW_").lower().split("__")
    for part in path:
        assert model is not None, f"{env_name}: {part!r} is below a plain field"
        field = model.model_fields.get(part)
        assert field is not None, f"{env_name}: no settings field {part!r} in {model.__name__}"
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return path


def _env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    text = re.sub(r"(?m)^\s*#.*$", "", text)
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:], comments=True):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _unit_lines(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{key}=")]  # fmt: skip


def _unit_env() -> dict[str, str]:
    pairs = (p.split("=", 1) for line in _unit_lines("Environment") for p in shlex.split(line))
    return dict(pairs)


def _marketflow_services(doc: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in doc["services"].items():
        if service.get("image") == "marketflow:latest":
            yield name, service


def test_every_marketflow_env_var_is_a_settings_field() -> None:
    names = set(_dockerfile_env()) | set(_unit_env())
    for _, service in _marketflow_services(compose()):
        names |= set(_env_of(service))
    ours = sorted(n for n in names if n.startswith("MARKETFLOW_"))

    assert "MARKETFLOW_HTTP__CONTROL_TOKEN" in ours
    for name in ours:
        settings_path(name)
    with pytest.raises(AssertionError, match="no settings field"):
        settings_path("MARKETFLOW_HTTP__CONTROL_TOKN")


def daemon_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The daemon's settings inside the compose stack: the image's config.toml under the
    Dockerfile's ENV under the service's environment."""
    env = {**_dockerfile_env(), **_env_of(compose()["services"]["marketflow"])}
    for key in [k for k in os.environ if k.startswith("MARKETFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(ROOT / "config.toml")


# -- commands are accepted by their modules' argument parsers --------------------------------


class _Accepted(Exception):  # raised once the arguments are parsed: stop there
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parsed_args(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Run ``python -m MODULE ARGS`` up to its argument parsing, and no further: the parsed
    options, or a test failure when the module does not exist or rejects an argument."""
    assert Path(argv[0]).name.startswith("python"), argv
    assert argv[1] == "-m", argv
    module, args = argv[2], argv[3:]
    assert find_spec(module) is not None, f"no module {module}"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        raise _Accepted(original(self, *a, **kw))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Accepted as ok:
        return module, ok.namespace
    except SystemExit as exc:
        pytest.fail(f"{shlex.join(argv)}: rejected by its argument parser (exit {exc.code})")
    pytest.fail(f"{shlex.join(argv)}: parsed no arguments")


def _dockerfile_cmd() -> list[str]:
    line = next(x for x in DOCKERFILE.read_text().splitlines() if x.startswith("CMD "))
    cmd = json.loads(line[4:])
    assert isinstance(cmd, list)
    return [str(x) for x in cmd]


def test_every_command_runs_an_existing_module_with_accepted_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = compose()
    commands = {name: s.get("command", _dockerfile_cmd()) for name, s in
                _marketflow_services(doc)}  # fmt: skip
    commands["Dockerfile CMD"] = _dockerfile_cmd()
    commands["systemd ExecStart"] = shlex.split(_unit_lines("ExecStart")[0])

    parsed = {name: parsed_args(monkeypatch, argv) for name, argv in commands.items()}

    assert parsed["marketflow"][0] == "marketflow"
    assert str(parsed["systemd ExecStart"][1].config) == IMAGE_CONFIG
    for name in ("exchange1", "exchange2", "exchange3", "fixvenue", "fixvenue2", "wsvenue"):
        assert parsed[name][0] == "marketflow.simulator"
    with pytest.raises(pytest.fail.Exception, match="rejected"):
        parsed_args(monkeypatch, ["python", "-m", "marketflow", "--bogus-flag"])


def _published(service: Mapping[str, Any]) -> set[int]:
    """Container ports of a service's ``ports`` ("host_ip:host:container" short syntax)."""
    out: set[int] = set()
    for entry in service.get("ports", []):
        out.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return out


def test_ports_and_hosts_match_what_the_daemon_and_simulators_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = compose()
    services = doc["services"]
    settings = daemon_settings(monkeypatch)  # also: refused if the token were missing
    parsed = {name: parsed_args(monkeypatch, s["command"]) for name, s in
              _marketflow_services(doc) if "command" in s}  # fmt: skip
    listen = {name: ns for name, (module, ns) in parsed.items() if module == "marketflow.simulator"}

    assert _published(services["marketflow"]) == {settings.http.port, settings.capture.port}
    assert settings.http.control_token is not None
    assert f"EXPOSE {settings.http.port}" in DOCKERFILE.read_text()
    assert {e.name for e in settings.exchanges} == set(listen)
    for ex in settings.exchanges:
        assert ex.host in services, f"exchange {ex.name}: no compose service {ex.host}"
        sim = listen[ex.host]
        assert (sim.port, sim.host) == (ex.port, "0.0.0.0"), ex.name
        if ex.protocol == "fix":
            assert ex.target_comp_id == sim.comp_id
    assert urlsplit(settings.postgres.dsn).hostname in services
    assert urlsplit(settings.redis.url).hostname in services
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_runs_every_venue_make_run_starts_with_the_same_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    by_port = {}
    for name, service in _marketflow_services(compose()):
        if "command" in service and service["command"][2] == "marketflow.simulator":
            by_port[parsed_args(monkeypatch, service["command"])[1].port] = name
    for protocol, port, extra in SIMULATORS:
        assert port in by_port, f"make run starts a {protocol} venue on {port}; compose does not"
        argv = ["python", "-m", "marketflow.simulator", "--protocol", protocol,
                "--port", str(port), *extra]  # fmt: skip
        made = vars(parsed_args(monkeypatch, argv)[1])
        command = compose()["services"][by_port[port]]["command"]
        assert {**made, "host": "0.0.0.0"} == vars(parsed_args(monkeypatch, command)[1])


# -- the Kafka profile (issue 14): a KRaft broker, two ingest and two aggregate nodes -------------


def node_settings(monkeypatch: pytest.MonkeyPatch, service: str) -> Settings:
    """A Kafka-profile node's settings: config.toml under the Dockerfile's ENV under the
    service's environment, with the role its command gives (the command itself is checked
    by test_every_command_runs_an_existing_module_with_accepted_flags)."""
    doc = compose()["services"][service]
    command = list(doc["command"])
    for key in [k for k in os.environ if k.startswith("MARKETFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in {**_dockerfile_env(), **_env_of(doc)}.items():
        monkeypatch.setenv(key, value)
    return load_settings(ROOT / "config.toml", node={"role": command[command.index("--role") + 1]})


def test_kafka_profile_runs_two_ingest_and_two_aggregate_nodes_on_a_kraft_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].removeprefix("PLAINTEXT://")
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    roles: dict[str, list[str]] = {}
    ids = set()
    single = daemon_settings(monkeypatch)
    for name in ("ingest1", "ingest2", "aggregate1", "aggregate2"):
        service = services[name]
        assert service["profiles"] == ["kafka"], name
        assert "kafka" in service["depends_on"], name
        settings = node_settings(monkeypatch, name)
        roles.setdefault(settings.node.role, []).append(name)
        ids.add(settings.node.id)
        assert settings.kafka.bootstrap_servers == advertised, name
        assert settings.kafka.security_protocol == "PLAINTEXT"  # KAFKA_SECURITY_PROTOCOL unset
        # The same venues as the single process (one partition of the feeds topic each).
        assert settings.exchanges == single.exchanges, name
        if settings.node.role == "aggregate":
            assert urlsplit(settings.postgres.dsn).hostname in services
            assert urlsplit(settings.redis.url).hostname in services
    assert roles == {"ingest": ["ingest1", "ingest2"], "aggregate": ["aggregate1", "aggregate2"]}
    assert len(ids) == 4  # distinct node ids: group members and record headers tell them apart
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))  # no host port twice
    assert "kafka" not in _env_of(services["marketflow"]).get(
        "MARKETFLOW_KAFKA__BOOTSTRAP_SERVERS", ""
    )  # the default stack stays the single process


def test_kafka_profile_passes_sasl_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**TEST_ENV, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "mf",
           "KAFKA_SASL_PASSWORD": "s3cret", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}  # fmt: skip
    service = compose(env)["services"]["ingest2"]
    for key in [k for k in os.environ if k.startswith("MARKETFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in {**_dockerfile_env(), **_env_of(service)}.items():
        monkeypatch.setenv(key, value)
    k = load_settings(ROOT / "config.toml", node={"role": "ingest"}).kafka
    assert (k.security_protocol, k.sasl_mechanism, k.sasl_username) == (
        "SASL_SSL", "SCRAM-SHA-512", "mf",
    )  # fmt: skip
    assert k.sasl_password is not None
    assert k.sasl_password.get_secret_value() == "s3cret"


# -- the systemd unit --------------------------------------------------------------------------


def _verify(unit_text: str, tmp_path: Path) -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: run `make server-binaries` (apt-get systemd)")
    copy = tmp_path / UNIT.name  # verify needs the unit's own name
    copy.write_text(unit_text)
    proc = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    return f"{proc.returncode}\n{proc.stdout}{proc.stderr}".strip()


def _with_local_binary(text: str) -> str:
    """The unit with ExecStart's binary (it exists only on a deployed host) replaced by this
    interpreter; every other line unchanged."""
    binary = shlex.split(_unit_lines("ExecStart")[0])[0]
    assert binary == "/opt/marketflow/.venv/bin/python"
    return text.replace(f"ExecStart={binary} ", f"ExecStart={sys.executable} ", 1)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert _verify(_with_local_binary(UNIT.read_text()), tmp_path) == "0"


def test_systemd_analyze_verify_reports_a_bad_unit(tmp_path: Path) -> None:
    bad = _with_local_binary(UNIT.read_text()).replace("Restart=on-failure", "Restart=sometimes")

    assert "sometimes" in _verify(bad, tmp_path)
