"""``dualanodiff`` command line: one sub-command per module.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. The command modules import the
heavy parts (torch, the pipeline, the trainer) inside ``run`` and ``add_arguments``, so that ``dualanodiff --help``
and a mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from ..errors import DualAnoDiffError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (a typo, a missing or malformed option) in two lines, not the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dualanodiff_core.cli.demo", "offline end-to-end demo on the procedural MiniDefect data"),
    "generate": ("dualanodiff_core.cli.generate", "generate image/mask pairs and export a defect dataset"),
    "inspect": ("dualanodiff_core.cli.inspect", "show what a weights file holds; convert or export it"),
    "minidefect": ("dualanodiff_core.cli.minidefect", "write the procedural MiniDefect dataset (MVTec layout)"),
    "train": ("dualanodiff_core.cli.train", "fine-tune DualAnoDiff weights on a few defect images"),
    "train-all": (
        "dualanodiff_core.cli.train_all",
        "train (and optionally generate) every defect type of MVTec-layout categories, one job each",
    ),
}


#: commands that run as several processes under torchrun / accelerate launch (see docs/scaling.md)
MULTI_PROCESS = {"generate", "train", "train-all"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dualanodiff",
        description="DualAnoDiff: few-shot defect image + mask generation (CVPR 2025), headless.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: DUALANODIFF_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.set_defaults(_module=mod)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
        )
        importlib.import_module(mod).add_arguments(p)
    return parser


def _one_line(text: str, limit: int = 2) -> str:
    lines = [ln.rstrip() for ln in str(text).strip().splitlines() if ln.strip()]
    if len(lines) > limit:
        lines = lines[: limit - 1] + [lines[limit - 1] + " ..."]
    return "\n".join(lines)


def _on_sigterm(signum, frame):
    # a polite kill: unwind like Ctrl-C so temp files are removed and locks released
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input, 1 a failure during the run, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get("DUALANODIFF_DEBUG", "") not in ("", "0")
    prefix = f"dualanodiff {args.command}: error:"
    old_term = None
    if hasattr(signal, "SIGTERM"):
        try:
            old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            old_term = None
    from .. import distributed

    joined = False
    if distributed.is_distributed():
        prefix = f"dualanodiff {args.command} (process {distributed.rank()}): error:"
    try:
        module = importlib.import_module(args._module)
        if distributed.is_distributed():
            if args.command not in MULTI_PROCESS:
                raise ValueError(
                    f"this command runs as one process; start it without torchrun / accelerate launch (those run "
                    f"{', '.join(sorted(MULTI_PROCESS))})"
                )
            joined = distributed.init()
        return int(module.run(args) or 0)
    except DualAnoDiffError as e:
        if debug:
            raise
        print(f"{prefix} {_one_line(e)}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        # user mistakes reported by plain Python errors: one clear line, no traceback
        if debug:
            raise
        print(f"{prefix} {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        from ..fileio import os_error_message

        print(f"{prefix} {os_error_message(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        if debug:
            raise
        print(f"{prefix} out of memory; use a smaller --size or --batch-size (or another --device).", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dualanodiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{prefix} unexpected {type(e).__name__}: {first}", file=sys.stderr)
        print("(run again with --debug to see where; please report it with that output)", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if joined:
            distributed.close()


if __name__ == "__main__":
    sys.exit(main())
