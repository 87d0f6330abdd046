"""``dualanodiff`` command line: one sub-command per module.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. The command modules import the
heavy parts (torch, the pipeline, the trainer) inside ``run`` and ``add_arguments``, so that ``dualanodiff --help``
and a mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DualAnoDiffError

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
    parser = argparse.ArgumentParser(
        prog="dualanodiff",
        description="DualAnoDiff: few-shot defect image + mask generation (CVPR 2025), headless.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    from .. import distributed

    joined = False
    try:
        if distributed.is_distributed():
            if args.command not in MULTI_PROCESS:
                raise ValueError(
                    f"this command runs as one process; start it without torchrun / accelerate launch (those run "
                    f"{', '.join(sorted(MULTI_PROCESS))})"
                )
            joined = distributed.init()
        return int(module.run(args) or 0)
    except (DualAnoDiffError, ValueError, FileNotFoundError, FileExistsError) as e:
        # user mistakes (and a training run that cannot go on): one clear line, no traceback
        who = f" (process {distributed.rank()})" if distributed.is_distributed() else ""
        print(f"dualanodiff {args.command}{who}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    finally:
        if joined:
            distributed.close()


if __name__ == "__main__":
    sys.exit(main())
