"""The Node packages of ``tests/node`` (pinned by its ``package-lock.json``), for the tests that
run clients and agents written in Node against a real mesh.

``require_node()`` installs them on first use (``npm ci`` into ``tests/node/node_modules``).
Where node or npm is missing, or the packages cannot be installed, the calling test is skipped
saying why; under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).parent / "node"
_INSTALLED = ("@grpc/grpc-js", "@grpc/proto-loader", "@a2a-js/sdk", "@bufbuild/protobuf", "express")


@functools.cache
def _node_missing() -> str:
    """Empty when node and the pinned packages are ready; else why not (installing them once)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node and npm are not installed (apt-get install -y nodejs npm)"
    if all((NODE_DIR / "node_modules" / name).is_dir() for name in _INSTALLED):
        return ""
    try:
        subprocess.run(
            [npm, "ci", "--silent", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        output = getattr(exc, "stderr", b"") or b""
        return f"cannot install the Node packages (npm ci in tests/node): {exc} {output.decode()[-300:]}"
    return ""


def require_node(what: str) -> None:
    """Skip (fail under ``CI=true``) the calling test when Node or its packages are missing."""
    reason = _node_missing()
    if not reason:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(f"{reason}; {what} did not run")


async def run_node(script: str, *args: str) -> list[dict[str, Any]]:
    """Run ``tests/node/<script>`` with ``args`` (60 s at most); the JSON objects it printed, one a line."""
    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / script), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()[-2000:]
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
