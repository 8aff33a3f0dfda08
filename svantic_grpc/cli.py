"""The `svantic-grpc` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import secrets
import signal
import sys

# a2a-sdk wraps each of its client and server calls in OpenTelemetry decorators, decided once
# when it is imported; they cost ~0.4-0.5 ms of CPU per hosted message (bench/message_roundtrip.py
# --hosted: 2.9 -> 2.4 ms) and, traced or not, report to OpenTelemetry's global provider, which the
# server does not set (its own spans, the dispatch's included, carry the trace to hosted agents).
# So they are off unless the operator sets the variable.
os.environ.setdefault("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", "false")

from svantic_grpc import cli_inputs, logs  # after the switch above: these load a2a-sdk
from svantic_grpc.config import Settings, SettingsError, settings_for_serve, with_overrides
from svantic_grpc.core.auth import hash_secret
from svantic_grpc.server import MeshServer, event_loop_factory

__all__ = ["GENERATED_SECRET_COST", "main"]

GENERATED_SECRET_COST = 2**10
"""scrypt's N for secrets ``hash-secret --generate`` makes: 256 random bits need no slow hash to
resist guessing, and 1,000 agents with their own credentials sign in after a restart in ~2.6 s
of server CPU instead of ~40 s (``bench/scale_tokens.py --cost 10``)."""


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can be caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`svantic-grpc pending --json | head`): end quietly, as other tools
        # do; stdout goes to /dev/null so the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command ended by it


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="svantic-grpc", description="An agent mesh served over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the mesh server")
    serve.add_argument(
        "--settings",
        help="settings file (default: ./settings.json when there is one, else the embedded defaults)",
    )
    serve.add_argument("--grpc-address", help="override grpc_address, e.g. 127.0.0.1:50051")
    serve.add_argument("--http-address", help="override http_address, e.g. 127.0.0.1:8080")
    hashing = commands.add_parser(
        "hash-secret", help="hash a client secret for settings.json (reads it from stdin)"
    )
    hashing.add_argument(
        "--generate",
        action="store_true",
        help="make a new random 256-bit secret instead of reading one; prints the secret, then its hash "
        "(scrypt N=2**10: a machine-made secret cannot be guessed, so the first sign-in after a "
        "restart need not cost a full scrypt)",
    )
    cli_inputs.add_commands(commands)  # pending, resolve: operator commands for input requests
    args = parser.parse_args(argv)
    if args.command in cli_inputs.COMMANDS:
        return cli_inputs.run(args)
    if args.command == "hash-secret" and args.generate:
        secret = secrets.token_urlsafe(32)
        print(f"secret: {secret}")
        print(f"hash:   {hash_secret(secret, cost=GENERATED_SECRET_COST)}")
        return 0
    if args.command == "hash-secret":
        secret = (
            getpass.getpass("client secret: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        )
        if not secret:
            print("no secret given", file=sys.stderr)
            return 2
        print(hash_secret(secret))
        return 0
    return _serve(args.settings, args.grpc_address, args.http_address)


def _serve(settings_path: str | None, grpc_address: str | None, http_address: str | None) -> int:
    try:
        settings, source = settings_for_serve(settings_path)
        overrides = {"grpc_address": grpc_address, "http_address": http_address}
        if any(overrides.values()):
            settings = with_overrides(settings, **{k: v for k, v in overrides.items() if v})
    except SettingsError as exc:
        print(f"svantic-grpc: invalid settings\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("svantic_grpc").info("settings: %s", source)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings)) as runner:
            runner.run(_run(settings))
    except SettingsError as exc:
        print(f"svantic-grpc: {exc}", file=sys.stderr)
        return 2
    return 0


async def _run(settings: Settings) -> None:
    server = MeshServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        starting = asyncio.ensure_future(server.start())
        signalled = asyncio.ensure_future(stop.wait())
        # A signal during start-up (a store or a service that does not answer) is heard too.
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # its error, if any, is the command's
            await signalled
        else:
            starting.cancel()  # its own clean-up runs before the stop (within the stop's bound)
            await asyncio.wait({starting}, timeout=settings.shutdown_timeout_s)
        logging.getLogger("svantic_grpc").info("shutting down (grace %.1fs)", settings.shutdown_grace_s)
    except BaseException:
        await server.stop()
        raise
    stop.clear()
    await _stop_within(server, settings, again=stop)


async def _stop_within(server: MeshServer, settings: Settings, *, again: asyncio.Event) -> None:
    """Stop ``server``, but never for longer than the grace and ``shutdown_timeout_s``, nor past a
    second signal: a stop waits for the store writes under way (they run to their end), and a store
    that stopped answering would otherwise keep the process for ever, deaf to SIGTERM. Exiting then
    is what a crash does, which the store is built for: what was acknowledged is kept, and what was
    running resumes at the next start."""
    stopping = asyncio.ensure_future(server.stop())
    signalled = asyncio.ensure_future(again.wait())
    limit = 2 * settings.shutdown_grace_s + settings.shutdown_timeout_s  # gRPC's grace, then HTTP's
    await asyncio.wait({stopping, signalled}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if stopping.done():
        stopping.result()  # its error, if any, is the command's
        return
    waiting = sorted(task.get_name() for task in asyncio.all_tasks() if task is not asyncio.current_task())
    logging.getLogger("svantic_grpc").error(
        "the stop did not finish (%s); exiting now, as a crash would: every acknowledged write is in "
        "the store and the next start resumes what was running. Still under way: %s",
        "a second signal" if again.is_set() else f"still stopping after {limit:g}s",
        ", ".join(waiting[:8]) + (f" and {len(waiting) - 8} more" if len(waiting) > 8 else ""),
    )
    logging.shutdown()
    os._exit(1)  # not SystemExit: that would wait for the very work that does not end


if __name__ == "__main__":
    sys.exit(main())
