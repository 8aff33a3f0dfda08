"""The README's walkthrough, run as written, in order, twice, on one fresh server.

The bash blocks of the README's "Walkthrough" and "Messages and agents" sections run in
bash verbatim, but for the server's address (a free port here), the interpreter (this one)
and the echo agent, which the README starts "in another terminal" and the script starts in
the background (and stops with SIGINT, as Ctrl-C would). grpcurl is the real one when
$GRPCURL names it, otherwise tests/grpcurl_standin.py; jq must be installed, as the README
says, or the test is skipped.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests._support import running_server

REPO_ROOT = Path(__file__).resolve().parents[1]
README_ADDRESS = "127.0.0.1:50051"
TIMEOUT_S = 50.0


def _script(target: str, echo_log: Path) -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Walkthrough") : readme.index("## Humans in the loop")]
    blocks = [textwrap.dedent(b) for b in re.findall(r"^ *```bash\n(.*?)^ *```", section, re.S | re.M)]
    steps = ["set -euo pipefail"]
    for block in blocks:
        if "examples/echo_agent.py" in block:  # "in another terminal": here in the background
            command = block.split("#", 1)[0].strip()
            steps += [
                f"{command} > {echo_log} 2>&1 &",
                "ECHO=$!",
                "for _ in $(seq 300); do  # until it says it is connected, 30 s at most",
                f"  grep -q 'connected to the mesh' {echo_log} && break; sleep 0.1",
                "done",
            ]
            continue
        steps.append(block)
        if "WatchSession &" in block:
            steps.append("wait  # the WatchSession in the background ends when its session closes")
    steps += ["kill -INT $ECHO", "wait $ECHO && echo 'echo agent exit 0'"]
    script = "\n".join(steps)
    for needed in (
        "walkthrough.py",
        "GetToken",
        "InitSession",
        "WatchSession &",
        "CloseSession",
        "SendMessage",
    ):
        assert needed in script, f"the README's walkthrough no longer has {needed}"
    return script.replace(README_ADDRESS, target).replace(".venv/bin/python", sys.executable)


def _grpcurl_on_path(bin_dir: Path) -> str:
    bin_dir.mkdir()
    real = os.environ.get("GRPCURL")
    wrapper = bin_dir / "grpcurl"
    if real:
        wrapper.symlink_to(real)
    else:
        standin = Path(__file__).with_name("grpcurl_standin.py")
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{standin}" "$@"\n')
        wrapper.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.timeout(2 * TIMEOUT_S + 30)
async def test_the_readme_walkthrough_runs_in_order_twice_on_one_fresh_server(tmp_path: Path) -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (the README's grpcurl lines use it)")
    env = {**os.environ, "PATH": _grpcurl_on_path(tmp_path / "bin"), "PYTHONUNBUFFERED": "1"}
    async with running_server(env={}, tenants=[]) as client:  # the development default, as `serve`
        for run in (1, 2):
            script = _script(client.server.target, tmp_path / f"echo-{run}.log")
            bash = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                script,
                cwd=REPO_ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    raw_out, raw_err = await bash.communicate()
            finally:
                if bash.returncode is None:
                    bash.kill()
                    await bash.wait()
            out, err = raw_out.decode(), raw_err.decode()
            assert bash.returncode == 0, f"run {run} failed:\n{out}\n{err}"
            assert "ERROR" not in err, err
            assert "closed: closed by svantic" in out  # examples/walkthrough.py
            assert '"join_reason": "JOIN_REASON_INVITED"' in out  # InviteAgent
            assert '"to_status": "SESSION_STATUS_CLOSED"' in out  # WatchSession followed it to the end
            assert '"status": "SERVING"' in out  # the health check
            assert '"text": "echo: please echo this"' in out  # SendMessage, answered by the echo agent
            assert "echo agent exit 0" in out  # stopped by SIGINT, cleanly
