"""The `svantic-grpc` command, run as a real subprocess on loopback."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svantic_grpc.core.auth import verify_secret
from svantic_grpc.pb import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _env_without_signing_key() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _settings_file(tmp_path: Path, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "grpc_address": f"127.0.0.1:{_free_port()}",
        "http_address": "127.0.0.1:0",
        "shutdown_grace_s": 1,
    }
    data.update(overrides)
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data))
    return path


class _Server:
    """A `serve` subprocess whose stderr is drained by a thread, line by line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT_S) -> str:
        """The first stderr line containing ``text``; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {text!r} on stderr within {timeout}s:\n{''.join(self.lines)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"process ended before {text!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line

    def first_of(self, *texts: str, timeout: float = START_TIMEOUT_S) -> str:
        """The first stderr line containing any of ``texts``, or "" if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"none of {texts!r} on stderr within {timeout}s:\n{''.join(self.lines)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                return ""
            self.lines.append(line)
            if any(text in line for text in texts):
                return line

    def finish(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int, str]:
        """Wait for exit; returns the exit code and all of stderr."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return code, "".join(self.lines)


@contextmanager
def _serve(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> Iterator[_Server]:
    process = subprocess.Popen(
        [sys.executable, "-m", "svantic_grpc", "serve", *args],
        cwd=cwd,
        env=_env_without_signing_key() if env is None else env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = _Server(process)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)
        server._reader.join(timeout=STOP_TIMEOUT_S)
        assert process.stderr is not None
        process.stderr.close()


def _run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svantic_grpc", *args],
        cwd=cwd,
        env=_env_without_signing_key() if env is None else env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio", None], ids=["uvloop", "asyncio", "default"])
def test_serve_answers_and_stops_cleanly_on_a_signal(
    tmp_path: Path, signum: signal.Signals, event_loop: str | None
) -> None:
    settings = _settings_file(tmp_path, **({"event_loop": event_loop} if event_loop else {}))
    with _serve("--settings", str(settings)) as server:
        ready = server.wait_for("serving gRPC on")
        target = ready.rsplit("serving gRPC on ", 1)[1].split()[0]
        assert target == json.loads(settings.read_text())["grpc_address"]
        assert f"event loop: {event_loop or 'uvloop'})" in ready  # uvloop unless told otherwise
        assert any("DEVELOPMENT MODE" in line for line in server.lines)

        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            auth = auth_service_pb2_grpc.AuthServiceStub(channel)
            token = auth.GetToken(
                auth_service_pb2.GetTokenRequest(
                    client_id="svantic", client_secret="your-secret", agent_type="cliq"
                ),
                timeout=RPC_TIMEOUT_S,
            )
            assert token.token
            assert token.tenant_id == "dev"
            # A session's events stream on this loop too (every write wakes it once).
            auth_md = (("authorization", f"Bearer {token.token}"),)
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            created = sessions.InitSession(
                session_service_pb2.InitSessionRequest(), metadata=auth_md, timeout=RPC_TIMEOUT_S
            )
            watch = sessions.WatchSession(
                session_service_pb2.WatchSessionRequest(session_id=created.session.session_id),
                metadata=auth_md,
                timeout=RPC_TIMEOUT_S,
            )
            first = next(watch)
            assert first.event.sequence == 1
            assert first.event.session_id == created.session.session_id
            watch.cancel()

        server.process.send_signal(signum)
        code, stderr = server.finish()
        assert code == 0, stderr
        assert "stopped" in stderr


def test_grpc_address_flag_overrides_the_settings_file(tmp_path: Path) -> None:
    settings = _settings_file(tmp_path)
    port = _free_port()
    with _serve("--settings", str(settings), "--grpc-address", f"127.0.0.1:{port}") as server:
        ready = server.wait_for("serving gRPC on")
        assert f"127.0.0.1:{port}" in ready
        server.process.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
        assert code == 0, stderr


def test_grpc_address_flag_is_validated_like_the_settings_file(tmp_path: Path) -> None:
    settings = _settings_file(tmp_path)
    with _serve("--settings", str(settings), "--grpc-address", "127.0.0.1:99999") as server:
        line = server.first_of("serving gRPC on", "grpc_address")
        if "serving gRPC on" in line:
            server.process.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    assert "serving gRPC on" not in stderr
    assert code == 2, stderr
    assert "grpc_address" in stderr


def test_serve_with_invalid_settings_exits_2_naming_the_key(tmp_path: Path) -> None:
    settings = _settings_file(tmp_path, session_ttl_ms="soon", auth={"token_ttl": 5})
    result = _run("serve", "--settings", str(settings))
    assert result.returncode == 2, result.stderr
    assert "session_ttl_ms" in result.stderr
    assert "auth.token_ttl" in result.stderr
    assert "unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_missing_settings_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = _run("serve", "--settings", str(missing))
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_in_development_mode_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    settings = _settings_file(tmp_path)
    result = _run("serve", "--settings", str(settings), "--grpc-address", f"0.0.0.0:{_free_port()}")
    assert result.returncode != 0
    assert "loopback" in result.stderr
    assert "SVANTIC_SIGNING_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving gRPC on" not in result.stderr


def test_serve_refuses_an_address_already_in_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = _settings_file(tmp_path, grpc_address=f"127.0.0.1:{port}")
        result = _run("serve", "--settings", str(settings))
    assert result.returncode == 2, result.stderr
    assert "grpc_address" in result.stderr
    assert "Traceback" not in result.stderr


def test_hash_secret_prints_a_salted_verifiable_hash() -> None:
    first = _run("hash-secret", stdin="correct horse battery staple\n")
    second = _run("hash-secret", stdin="correct horse battery staple\n")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    first_hash, second_hash = first.stdout.strip(), second.stdout.strip()
    assert first_hash != second_hash
    assert verify_secret("correct horse battery staple", first_hash)
    assert verify_secret("correct horse battery staple", second_hash)
    assert not verify_secret("correct horse battery", first_hash)
    assert "correct horse" not in first.stdout + first.stderr


def test_hash_secret_generate_makes_a_random_secret_with_a_cheaper_verifiable_hash() -> None:
    first, second = _run("hash-secret", "--generate"), _run("hash-secret", "--generate")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    secrets, hashes = [], []
    for result in (first, second):
        secret_line, hash_line = result.stdout.splitlines()
        secrets.append(secret_line.removeprefix("secret: "))
        hashes.append(hash_line.removeprefix("hash:").strip())
    assert secrets[0] != secrets[1] and len(secrets[0]) >= 43  # 32 random bytes, url-safe base64
    assert verify_secret(secrets[0], hashes[0]) and verify_secret(secrets[1], hashes[1])
    assert not verify_secret(secrets[0], hashes[1])
    assert hashes[0].startswith("scrypt$1024$")


def test_hash_secret_refuses_an_empty_secret() -> None:
    result = _run("hash-secret", stdin="\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no secret" in result.stderr


# --- first steps: where the settings come from, where the database may go --------------------


def _serving_target(server: _Server) -> str:
    ready = server.wait_for("serving gRPC on")
    return ready.rsplit("serving gRPC on ", 1)[1].split()[0]


def test_serve_outside_the_repository_runs_on_the_embedded_defaults(tmp_path: Path) -> None:
    assert not (tmp_path / "settings.json").exists()
    with _serve("--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0", cwd=tmp_path) as server:
        target = _serving_target(server)
        assert any("embedded defaults" in line for line in server.lines)
        with grpc.insecure_channel(target) as channel:
            token = auth_service_pb2_grpc.AuthServiceStub(channel).GetToken(
                auth_service_pb2.GetTokenRequest(
                    client_id="svantic", client_secret="your-secret", agent_type="a2ui-terminal"
                ),
                timeout=RPC_TIMEOUT_S,
            )
            assert token.tenant_id == "dev"
        server.process.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_serve_reads_settings_json_in_the_working_directory(tmp_path: Path) -> None:
    _settings_file(tmp_path, grpc_address="127.0.0.1:0", log_level="DEBUG")
    with _serve(cwd=tmp_path) as server:
        _serving_target(server)
        assert any("settings: settings.json" in line for line in server.lines)
        assert any(" DEBUG " in line for line in server.lines)  # the file's log_level, not the default
        server.process.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    assert code == 0, stderr


def test_a_named_settings_file_that_is_missing_is_still_an_error_from_anywhere(tmp_path: Path) -> None:
    result = _run("serve", "--settings", "mesh-settings.json", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "mesh-settings.json: no such settings file" in result.stderr
    assert "Traceback" not in result.stderr


def _refused(tmp_path: Path, store: str) -> str:
    settings = _settings_file(tmp_path, store=store)
    result = _run("serve", "--settings", str(settings))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "serving gRPC on" not in result.stderr
    return result.stderr


def test_a_database_in_a_missing_directory_is_refused_not_created(tmp_path: Path) -> None:
    typo = tmp_path / "var-lib-svantik"
    stderr = _refused(tmp_path, f"sqlite://{typo / 'mesh.db'}")
    assert f"store: directory {typo} does not exist" in stderr
    assert not typo.exists()


@contextmanager
def _unwritable_directory(path: Path) -> Iterator[Path]:
    """A directory nobody may write into: mode 0555, or, for root (whom modes do not stop), immutable."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root, and chattr +i is not available to make a directory unwritable")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_database_in_an_unwritable_directory_is_refused(tmp_path: Path) -> None:
    with _unwritable_directory(tmp_path / "locked") as locked:
        stderr = _refused(tmp_path, f"sqlite://{locked / 'mesh.db'}")
    assert f"store: directory {locked} is not writable" in stderr


@pytest.mark.parametrize(
    ("env", "instrumented"),
    [
        ({}, False),  # a2a-sdk's per-call decorators are off
        # traced too: they would report to OpenTelemetry's global provider, which the server never sets
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        ({"OTEL_INSTRUMENTATION_A2A_SDK_ENABLED": "true"}, True),  # the operator's own choice stands
    ],
)
def test_the_command_turns_a2a_sdks_own_instrumentation_off_unless_the_operator_sets_it(
    env: dict[str, str], instrumented: bool
) -> None:
    probe = "import svantic_grpc.cli, a2a.utils.telemetry as t; print(t.otel_enabled)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(instrumented)
