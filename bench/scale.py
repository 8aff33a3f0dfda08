"""Scale benchmarks of issue 12 (items 3-7), one after another: sessions, streams, tokens.

Run from the repository root::

    .venv/bin/python bench/scale.py                      # every part
    .venv/bin/python bench/scale.py sessions tokens      # some parts
    .venv/bin/python bench/scale.py sessions -- --sessions 20000   # arguments for the parts

Each part is its own script (``bench/scale_<part>.py``, runnable alone with ``--help``)
that starts its servers in their own processes on 127.0.0.1, measures in one run, and
prints its figures beside the issue's target. This driver only runs them in turn and
repeats their verdict lines at the end.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

PARTS = {
    "sessions": "memory per idle session; InitSession+CloseSession against bare calls; ListSessions pages",
    "streams": "memory per connected agent and WatchSession subscriber; fan-out to 1,000 subscribers",
    "tokens": "GetToken CPU for 1,000 agents reconnecting; failed-attempt limits",
}
HERE = Path(__file__).resolve().parent


class _Tee(io.TextIOBase):
    """Writes through to the terminal and keeps a copy (for the summary)."""

    def __init__(self, out: io.TextIOBase) -> None:
        self.out = out
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.out.write(text)
        self.out.flush()
        return self.kept.write(text)


def _run(part: str, argv: list[str]) -> tuple[int, str]:
    path = HERE / f"scale_{part}.py"
    spec = importlib.util.spec_from_file_location(f"scale_{part}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    tee = _Tee(sys.stdout)  # type: ignore[arg-type]
    with redirect_stdout(tee):
        code = module.main(argv)
    return int(code or 0), tee.kept.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        extra = args[args.index("--") + 1 :]
        args = args[: args.index("--")]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        for name, what in PARTS.items():
            print(f"  {name}: {what}")
        return 0
    chosen = args or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        print(f"unknown part(s): {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    verdicts: list[str] = []
    worst = 0
    for part in chosen:
        print(f"\n===== {part}: {PARTS[part]}\n", flush=True)
        code, output = _run(part, extra)
        worst = max(worst, code)
        verdicts += [f"{part}: {line.strip()}" for line in output.splitlines() if "target" in line.lower()]
    print("\n===== against the targets")
    print("\n".join(verdicts) or "(no verdict lines printed)")
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
