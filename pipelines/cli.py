"""The `pulsepipe` command line: one sub-command per job, each module owning its own arguments."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module under pipelines/ exposing add_arguments(parser) and main(args) -> int
COMMANDS = {
    "synth": ("synth", "write a synthetic cohort with known heart rates"),
    "infer": ("infer", "heart rate and BVP from one video or image folder"),
    "demo": ("demo", "synthesise a small cohort and measure it, all on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pulsepipe",
        description="Facial videos to heart-rate results: synthesis, single-video inference, cohort jobs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(f"pipelines.{module_name}")
        p = sub.add_parser(name, help=summary, description=(module.__doc__ or summary).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pulsepipe")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
