"""Command line: ``python -m fastinfluence <command>`` (also the ``fastinfluence`` script)."""

import argparse
import json


def _info(args: argparse.Namespace) -> int:
    from fastinfluence._extension import format_info, info

    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen subcommand, return its status."""
    parser = argparse.ArgumentParser(prog="fastinfluence", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser(
        "info", help="native extension, devices, torch/CUDA versions and registered ops"
    )
    info_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    info_parser.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)
