"""Command line: ``python -m fastinfluence <command>`` (also the ``fastinfluence`` script)."""

import argparse
import json
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from fastinfluence._extension import format_info, info

    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fastinfluence.demo import DemoConfig, DemoSizeError, run_demo

    config = DemoConfig(
        seed=args.seed, epochs=args.epochs, image_size=args.image_size,
        label_noise=args.label_noise, n_slices=args.slices, n_patients=args.patients,
        out=args.out, progress=args.progress, device=args.device,
    )
    try:
        config.validate()
    except ValueError as error:
        # An argument error (usage, exit status 2) before any data is generated.
        args.parser.error(str(error))
    try:
        run_demo(config)
    except DemoSizeError as error:  # settings too small for the data: a usage error too
        args.parser.error(str(error))
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from fastinfluence.demo import DemoConfig

    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo",
        help="train the paper's CNN on noisy brain-tumour MRI with flipped labels and rank "
        "the training samples by influence (PNG + JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--seed", type=int, default=defaults.seed,
                      help="seed of the data, noise, label flips and training")
    demo.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    demo.add_argument("--image-size", type=int, default=defaults.image_size,
                      help="image side, a multiple of 32")
    demo.add_argument("--label-noise", type=float, default=defaults.label_noise,
                      help="fraction of each training class whose label is flipped")
    demo.add_argument("--slices", type=int, default=defaults.n_slices,
                      help="slices to generate")
    demo.add_argument("--patients", type=int, default=defaults.n_patients,
                      help="patients to generate")
    demo.add_argument("--out", type=Path, default=defaults.out,
                      help="PNG path; summary.json is written next to it")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction,
                      default=defaults.progress, help="show progress bars")
    demo.add_argument("--device", default=defaults.device,
                      help="cpu, cuda, ...; None: cuda when available, else cpu")
    demo.set_defaults(run=_demo, parser=demo)


def _score(args: argparse.Namespace) -> int:
    from fastinfluence.score_command import CommandError, config_from, run_score

    try:
        summary = run_score(config_from(args))
    except CommandError as error:
        # An input error (usage, exit status 2), found before the influence work.
        args.parser.error(str(error))
    if summary["writer"]:
        reused = "reused from out" if summary["reused_ihvp"] else "solved and saved"
        print(f"{summary['what']} of {summary['samples']} samples written to {summary['out']} "
              f"(s {reused}; path {summary['path']}, solver {summary['solver']}, hessian "
              f"{summary['hessian']}"
              + (f"; torch.distributed {summary['distributed']}" if summary["distributed"]
                 else "") + "); read them with "
              f"fastinfluence.read_output(out, {summary['what']!r})")
    return 0


def _add_score(commands: argparse._SubParsersAction) -> None:
    from fastinfluence.score_command import add_arguments

    score = commands.add_parser(
        "score",
        help="influence of a saved model (module:callable + checkpoint) over saved data, "
        "written to a resumable output directory; runs under torchrun unchanged",
        description="Example: python -m fastinfluence score --model mypkg.models:make_net "
        "--checkpoint model.pt --train train.pt --val val.pt --out runs/influence "
        "(a rerun of the same command finishes a killed run; other settings are refused)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(score)
    score.set_defaults(run=_score, parser=score)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen subcommand, return its status."""
    parser = argparse.ArgumentParser(prog="fastinfluence", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser(
        "info", help="native extension, devices, torch/CUDA versions and registered ops"
    )
    info_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    info_parser.set_defaults(run=_info)
    _add_demo(commands)
    _add_score(commands)
    args = parser.parse_args(argv)
    return args.run(args)
