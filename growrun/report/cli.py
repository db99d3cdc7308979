"""`growrun report DIR [DIR ...] [--out OUT]`: the comparison report of a sweep.

Reads every run under the DIRs (growrun.report.runs), groups the completed ones by the swept
keys and averages over seeds (growrun.report.table), and writes into OUT

    report.md    the table (accuracies in %, mean ± std), paper references where the protocol
                 matches, the plots, and the missing or failed runs with their reasons
    report.csv   one row per group, raw numbers
    *.png        the plots (growrun.report.plots)

Everything is computed before anything is written, and each file is written to a temporary
name and renamed, so a crash never leaves a half-written report.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from growrun.errors import GrowrunError

USAGE = """usage: growrun report DIR [DIR ...] [--out OUT]

Compare the runs of one or more sweeps: group them by the swept override keys, average over
seeds, and write report.md, report.csv and plots (PNG) into OUT.

arguments:
  DIR          a sweep directory (outputs/multirun/<...>), a run directory (holding .hydra/),
               or a directory of sweeps; several may be given
  --out OUT    where to write the report (created if missing); default: DIR when one DIR is
               given, required with several
  -h, --help   show this help
"""


def parse_args(argv: list[str]) -> tuple[list[Path], Path | None, bool]:
    dirs: list[Path] = []
    out: Path | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return [], None, True
        if arg == "--out" or arg.startswith("--out="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise GrowrunError("--out needs a directory: growrun report DIR [DIR ...] --out OUT")
            out = Path(value)
            i += 1 if "=" in arg else 2
            continue
        if arg.startswith("-") and arg != "-":
            raise GrowrunError(f"unknown option {arg}; allowed: --out OUT, -h/--help")
        dirs.append(Path(arg))
        i += 1
    if not dirs:
        raise GrowrunError("report needs at least one run or sweep directory: growrun report DIR [DIR ...] "
                           "[--out OUT]")
    if out is None:
        if len(dirs) > 1:
            raise GrowrunError(f"--out is required with several directories ({len(dirs)} given): "
                               "growrun report DIR [DIR ...] --out OUT")
        out = dirs[0]
    return dirs, out, False


def report_main(argv: list[str]) -> int:
    dirs, out, help_only = parse_args(list(argv))
    if help_only:
        print(USAGE, end="")
        return 0
    assert out is not None
    if out.exists() and not out.is_dir():
        raise GrowrunError(f"--out {out}: exists and is not a directory; give a directory")

    from growrun.report import collect
    from growrun.report.equal import pair_runs, warnings
    from growrun.report.plots import build_plots
    from growrun.report.render import markdown_table, report_csv, report_markdown

    runs, keys, groups = collect(dirs)
    pairs = pair_runs(groups)
    images, plots, skipped = build_plots(groups)
    files = {
        "report.md": report_markdown([str(d) for d in dirs], runs, keys, groups, plots, skipped, pairs).encode(),
        "report.csv": report_csv(keys, groups, pairs).encode(),
        **images,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [write_atomic(out / name, data) for name, data in files.items()]
        for name in stale_plots(images):
            (out / name).unlink(missing_ok=True)  # a plot skipped now must not show an old sweep's
    except OSError as ex:
        raise GrowrunError(f"--out {out}: cannot write the report ({ex.strerror or ex})") from ex

    bad = [r for r in runs if not r.ok]
    print(markdown_table(keys, groups, pairs) if groups else "no completed run: nothing to tabulate")
    for line in warnings(pairs):
        print(line)
    for r in bad:
        print(f"not included: {r.name}: {r.reason}")
    for path in written:
        print(f"wrote {path}")
    return 0


def stale_plots(images: dict[str, bytes]) -> list[str]:
    from growrun.report.plots import PLOTS

    return [name for name, *_ in PLOTS if name not in images]


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(report_main(sys.argv[1:]))
