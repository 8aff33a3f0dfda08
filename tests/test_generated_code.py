"""The committed generated code and the declared dependencies agree.

The generated modules check the installed runtimes at import: `*_pb2_grpc.py`
refuses a grpcio older than the grpcio-tools that wrote it, `*_pb2.py` a protobuf
older than the protoc inside it. If `pyproject.toml` allowed an older runtime than
that, a user could install a set the package then refuses to import; if the
generator were not pinned, the freshness check in CI would fail whenever
grpcio-tools published a patch release.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PB = ROOT / "svantic_grpc" / "pb"


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    reqs = [Requirement(line) for line in lines]
    return {req.name: req for req in reqs}


def _minimum(req: Requirement) -> Version:
    lows = [Version(spec.version) for spec in req.specifier if spec.operator in (">=", "==")]
    assert lows, f"{req} has no lower bound"
    return max(lows)


def _stamped(pattern: str, glob: str) -> set[str]:
    found = {m.group(1) for path in PB.glob(glob) for m in re.finditer(pattern, path.read_text())}
    assert found, f"no version stamp in {glob}"
    return found


def test_grpcio_minimum_is_what_the_generated_code_checks() -> None:
    (generated,) = _stamped(r"GRPC_GENERATED_VERSION = '([\d.]+)'", "*_pb2_grpc.py")
    assert _minimum(_requirements()["grpcio"]) == Version(generated)


def test_protobuf_minimum_is_what_the_generated_code_checks() -> None:
    (generated,) = _stamped(r"# Protobuf Python Version: ([\d.]+)", "*_pb2.py")
    assert _minimum(_requirements()["protobuf"]) == Version(generated)


def test_generator_is_pinned_to_the_version_that_wrote_the_code() -> None:
    tools = _requirements("dev")["grpcio-tools"]
    (pin,) = list(tools.specifier)
    assert pin.operator == "=="
    (generated,) = _stamped(r"GRPC_GENERATED_VERSION = '([\d.]+)'", "*_pb2_grpc.py")
    assert Version(pin.version) == Version(generated)


def test_the_freshness_check_names_a_generator_other_than_the_pinned_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # found from outside: after a non-dev install (another grpcio-tools) the check said "stale"
    from svantic_grpc import _codegen

    made = _codegen._generate

    def by_another(into: Path) -> None:
        made(into)
        first = sorted(into.glob("*_pb2_grpc.py"))[0]
        first.write_text(first.read_text().replace("1.85.1", "1.99.0"))

    monkeypatch.setattr(_codegen, "_generate", by_another)
    monkeypatch.setattr(_codegen.metadata, "version", lambda name: "1.99.0")
    assert _codegen.main(["--check"]) == 1
    said = capsys.readouterr().out
    assert "grpcio-tools 1.99.0 is installed" in said and "pip install -e '.[dev]'" in said
