"""What `pip install -e .` (the README's serve command, no dev extras) must bring.

The test suite installs the dev extras, which pull in more than the runtime list, so a
runtime requirement that is missing would only show on a user's first `serve`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def test_the_runtime_brings_the_a2a_sdk_parts_the_server_imports() -> None:
    # The A2A ingress serves a2a-sdk's Starlette routes (its http-server extra: sse-starlette)
    # and gRPC bindings (its grpc extra).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {req.name: req for req in map(Requirement, project["dependencies"])}
    assert {"grpc", "http-server"} <= runtime["a2a-sdk"].extras
