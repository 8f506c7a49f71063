"""The `pulsepipe` command line: one sub-command per job, each module owning its own arguments."""
from __future__ import annotations

import argparse
import importlib
import sys

from transforms.manifest import package_version

# sub-command -> module under pipelines/ exposing add_arguments(parser) and main(args) -> int
COMMANDS = {
    "synth": ("synth", "write a synthetic cohort with known heart rates"),
    "infer": ("infer", "heart rate and BVP from one video or image folder"),
    "preprocess": ("preprocess", "recordings to 30 fps face-crop shards, a manifest and dead letters (Beam or Ray)"),
    "augment": ("augment", "time-scaled extra recordings so heart rates cover 30-180 BPM (Beam or Ray)"),
    "evaluate": ("evaluate", "models over preprocessed recordings: predictions, metrics, a report (Beam or Ray)"),
    "train": ("train", "train ME-rPPG on preprocessed shards: whole-video sequences, resumable, data-parallel"),
    "refresh": ("refresh", "scheduled retraining: new data preprocessed, the champion retrained, gated, registered"),
    "live": ("live", "real-time pulse and heart rate from a camera, a stream or a file (ME-flow, a local page)"),
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args._module, "PASSES_PIPELINE_ARGS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pipeline_args = extra  # Beam pipeline options (--runner=DataflowRunner ...), passed through
    from pipelines.errors import JobError

    try:
        return int(args._module.main(args) or 0)
    except JobError as e:
        print(f"pulsepipe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
