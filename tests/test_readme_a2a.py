"""The README's A2A ingress block (the product's "Send Messages" step), run as written on a fresh server.

Only the addresses change (free ports here). grpcurl is the real one when $GRPCURL
names it, otherwise tests/grpcurl_standin.py; curl and jq must be installed, or the
test is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests._support import running_server
from tests.a2a_ingress_support import ingress_http
from tests.test_readme_walkthrough import REPO_ROOT, _grpcurl_on_path

MARKER = "<!-- a2a-walkthrough -->"


def _block() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"```bash\n(.*?)^```", readme[readme.index(MARKER) :], re.S | re.M)
    assert found, "the README's A2A ingress block is gone"
    return found.group(1)


async def test_the_readme_a2a_block_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("curl and jq are needed (the README's lines use them)")
    env = {**os.environ, "PATH": _grpcurl_on_path(tmp_path / "bin")}
    async with running_server(env={}, tenants=[]) as client, ingress_http(client) as base:
        http = base.removeprefix("http://")
        script = "set -euo pipefail\n" + _block().replace("127.0.0.1:50051", client.server.target).replace(
            "127.0.0.1:8080", http
        )
        bash = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=REPO_ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(30):
                raw_out, raw_err = await bash.communicate()
        finally:
            if bash.returncode is None:
                bash.kill()
                await bash.wait()
    out, err = raw_out.decode(), raw_err.decode()
    assert bash.returncode == 0, f"{out}\n{err}"
    # curl prints the JSON answer without a newline: the stream's first "data:" follows on its line
    sent, _ = json.JSONDecoder().raw_decode(out[out.index('{"id":"1"') :])
    assert sent["result"]["status"]["state"] == "completed", sent
    assert sent["result"]["contextId"] == "my-session-001" and sent["result"]["id"] == "msg-001"
    streamed = [json.loads(data) for data in re.findall(r"data: ?(\{.*\})\s*$", out, re.M)]
    lines = out.splitlines()
    assert streamed[0]["result"]["kind"] == "task"
    assert streamed[-1]["result"]["status"]["state"] == "completed"
    assert lines[-1] == "svantic mesh"
