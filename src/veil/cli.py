"""`veil <command>`: each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from veil import config as config_mod
    from veil.train import summarize, train

    if args.help_config:
        print(config_mod.describe())
        return 0
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        # One process per device through PyTorch's own launcher, each running this same command.
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        argv = _without_option(args.argv, "--nproc")  # each process runs the command without it
        try:
            torchrun(["--standalone", f"--nproc_per_node={args.nproc}", "-m", "veil", *argv])
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            print(f"veil train: training process {rank} failed with exit code {failure.exitcode}; its messages are above", file=sys.stderr)
            return 1
        return 0
    if args.resume:
        run_dir = Path(args.resume)
        cfg = config_mod.load(run_dir / "config.yaml", args.overrides) if (run_dir / "config.yaml").is_file() else None
        if cfg is None:
            raise config_mod.ConfigError(f"cannot resume: {run_dir / 'config.yaml'} not found")
        if args.overrides:
            # Only knobs that do not change what was trained may differ on resume.
            original = config_mod.load(run_dir / "config.yaml")
            allowed = {"device", "progress", "train.precision", "train.channels_last", "train.compile"}
            changed = [k for k in config_mod.valid_keys() if _get(cfg, k) != _get(original, k) and k not in allowed]
            if changed:
                raise config_mod.ConfigError(f"cannot change {', '.join(changed)} when resuming; only {', '.join(sorted(allowed))} may differ")
    else:
        if not args.config or not args.out:
            raise config_mod.ConfigError("veil train needs --config FILE and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = config_mod.load(args.config, args.overrides)
        run_dir = Path(args.out)
    summary = train(cfg, run_dir, resume=bool(args.resume))
    if not summary:
        return 0
    metrics = __import__("veil.rundir", fromlist=["read_metrics"]).read_metrics(run_dir)
    summary = summary or summarize(metrics, cfg)
    print_summary(summary)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from veil import config as config_mod
    from veil.bench import PHASES, bench, format_table

    cfg = config_mod.load(args.config, args.overrides) if args.config else config_mod.apply_overrides(config_mod.Config(), args.overrides)
    phases = tuple(args.phases.split(",")) if args.phases else PHASES
    result = bench(cfg, args.batches, args.repeats, args.warmup, phases, progress=cfg.progress and not args.json, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(name + "="):
            out.append(item)
    return out


def _get(cfg, dotted: str):  # noqa: ANN001, ANN202
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def print_summary(summary: dict) -> None:
    def pct(v):  # noqa: ANN001, ANN202
        return "n/a" if v is None else f"{v:.2%}"

    def db(v):  # noqa: ANN001, ANN202
        return "n/a" if v is None else f"{v:.2f} dB"

    print()
    print("                         test accuracy   reconstruction PSNR (training reconstructor)")
    print(f"before adversarial       {pct(summary['pretrain_test_accuracy']):>13}   {db(summary['undefended_test_psnr'])}")
    print(f"after adversarial        {pct(summary['final_test_accuracy']):>13}   {db(summary['final_test_psnr'])}")
    print(f"(lambda {summary['lambda_privacy']}, reconstructor {summary['reconstructor']}, {summary['seconds']:.0f} s of training)")


def build_parser() -> argparse.ArgumentParser:
    from veil import __version__

    parser = argparse.ArgumentParser(prog="veil", description="Privacy-preserving image classification with a learnable obfuscator.")
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run Algorithm 1 into a run directory (resumable)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last finished phase-epoch")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--nproc", type=int, default=1, help="train with N processes (torchrun on this machine: one per GPU, or N CPU processes)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. train.lambda_privacy=0 or width=0.25")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="images/s of each phase beside a bare PyTorch loop on the same model")
    p.add_argument("--config", help="YAML config file (default: the built-in defaults, width 1.0)")
    p.add_argument("--batches", type=int, default=8, help="batches per timed pass (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per phase; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per phase first (default 1)")
    p.add_argument("--phases", help="comma-separated subset of: pretrain, obfuscator_classifier, reconstructor, obfuscator, evaluate, obfuscate")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both loops (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. width=0.25 batch_size=256 device=cpu")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from veil.config import ConfigError
    from veil.data import DataError
    from veil.io import CheckpointError
    from veil.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"veil {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"veil {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
