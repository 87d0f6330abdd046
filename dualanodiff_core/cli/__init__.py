"""``dualanodiff`` command line: one sub-command per module.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used,
so ``dualanodiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("dualanodiff_core.cli.inspect", "show what a weights file holds; convert or export it"),
}


#: commands that run as several processes under torchrun / accelerate launch (see docs/scaling.md)
MULTI_PROCESS = {"generate", "train", "train-all"}


def register(name: str, module: str, help_text: str) -> None:
    COMMANDS[name] = (module, help_text)


def _known_commands() -> dict[str, tuple[str, str]]:
    # optional commands, present when their modules exist
    optional = {
        "train": ("dualanodiff_core.cli.train", "fine-tune DualAnoDiff weights on a few defect images"),
        "train-all": (
            "dualanodiff_core.cli.train_all",
            "train (and optionally generate) every defect type of MVTec-layout categories, one job each",
        ),
        "generate": ("dualanodiff_core.cli.generate", "generate image/mask pairs and export a defect dataset"),
        "demo": ("dualanodiff_core.cli.demo", "offline end-to-end demo on the procedural MiniDefect data"),
        "minidefect": ("dualanodiff_core.cli.minidefect", "write the procedural MiniDefect dataset (MVTec layout)"),
    }
    out = dict(COMMANDS)
    for name, (mod, help_text) in optional.items():
        if importlib.util.find_spec(mod) is not None:
            out.setdefault(name, (mod, help_text))
    return dict(sorted(out.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualanodiff",
        description="DualAnoDiff: few-shot defect image + mask generation (CVPR 2025), headless.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_text) in _known_commands().items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    import importlib.util  # noqa: F401  (used by _known_commands)

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
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # user mistakes: one clear line, no traceback
        who = f" (process {distributed.rank()})" if distributed.is_distributed() else ""
        print(f"dualanodiff {args.command}{who}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if joined:
            distributed.close()


if __name__ == "__main__":
    sys.exit(main())
