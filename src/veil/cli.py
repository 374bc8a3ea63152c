"""`veil <command>`: each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from veil import config as config_mod
    from veil.train import summarize, train

    if args.help_config:
        print(config_mod.describe())
        return 0
    if args.resume:
        run_dir = Path(args.resume)
        cfg = config_mod.load(run_dir / "config.yaml", args.overrides) if (run_dir / "config.yaml").is_file() else None
        if cfg is None:
            raise config_mod.ConfigError(f"cannot resume: {run_dir / 'config.yaml'} not found")
        if args.overrides:
            # Only knobs that do not change what was trained may differ on resume.
            original = config_mod.load(run_dir / "config.yaml")
            allowed = {"device", "progress"}
            changed = [k for k in config_mod.valid_keys() if _get(cfg, k) != _get(original, k) and k not in allowed]
            if changed:
                raise config_mod.ConfigError(f"cannot change {', '.join(changed)} when resuming; only {', '.join(sorted(allowed))} may differ")
    else:
        if not args.config or not args.out:
            raise config_mod.ConfigError("veil train needs --config FILE and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = config_mod.load(args.config, args.overrides)
        run_dir = Path(args.out)
    summary = train(cfg, run_dir, resume=bool(args.resume), tensorboard=args.tensorboard)
    if not summary:
        return 0
    metrics = __import__("veil.rundir", fromlist=["read_metrics"]).read_metrics(run_dir)
    summary = summary or summarize(metrics, cfg)
    print_summary(summary)
    return 0


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


def cmd_attack(args: argparse.Namespace) -> int:
    import dataclasses

    from veil.attack import AttackConfig, attack, attack_matrix, format_table, resolve_settings
    from veil.config import ConfigError

    if bool(args.run_dir) == bool(args.matrix):
        raise ConfigError("veil attack needs one RUN_DIR, or --matrix RUN_A RUN_B ... (not both)")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AttackConfig) if getattr(args, f.name) is not None}
    settings = resolve_settings(given)
    if args.matrix:
        matrix = attack_matrix(args.matrix, settings, args.out)
        print()
        print(Path(args.out, "matrix.md").read_text())
        return 0 if matrix else 1
    result = attack(args.run_dir, settings)
    print()
    print(format_table(result))
    print(f"\nwritten to {Path(args.run_dir) / 'attack'}/ (attack.json, attack.csv, attack.md, one PNG per attacker)")
    return 0


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a settings dataclass, its docstring as help; unset flags stay None."""
    import dataclasses
    import typing

    from veil.config import field_docs

    docs, hints, defaults = field_docs(cls), typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        flag, help_text = "--" + f.name.replace("_", "-"), f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)})"
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=hints[f.name], default=None, help=help_text)


def cmd_report(args: argparse.Namespace) -> int:
    from veil.report import report

    report(args.run_dirs, args.out, n_images=args.images)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from veil.report import db, pct
    from veil.sweep import parse_attack_settings, parse_strengths, sweep

    settings = parse_attack_settings(args.attack)
    rows = sweep(args.config, parse_strengths(args.lambdas), args.out, args.overrides, defence=args.defence, attack_settings=settings)
    if rows:
        print()
        print(f"{'point':<16}{'test accuracy':>15}{'strongest attacker PSNR':>26}{'re-id top-1':>14}")
        for r in rows:
            print(f"{r['name']:<16}{pct(r['test_accuracy']):>15}{db(r['psnr']) + ' dB':>26}{pct(r['reid_top1'], 1):>14}")
    return 0


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
    p.add_argument("--tensorboard", action="store_true", help="also log scalars and reconstructions to RUN_DIR/tensorboard (needs the tensorboard package)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. train.lambda_privacy=0 or width=0.25")
    p.set_defaults(func=cmd_train)

    from veil.attack import AttackConfig

    p = sub.add_parser("attack", help="Chosen Image Attack on a run: fresh attackers, white-box inversion, floor and ceiling")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory to attack; results go to RUN_DIR/attack/")
    p.add_argument("--matrix", nargs="+", metavar="RUN_DIR", help="attack several runs and write the attack x training reconstructor matrix (Table 3)")
    p.add_argument("--out", default="attack-matrix", help="folder for matrix.json/.csv/.md with --matrix (default: attack-matrix)")
    add_dataclass_flags(p, AttackConfig)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("report", help="tables and figures of runs or sweeps as one HTML page and Markdown")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (veil train), sweep directories (veil sweep) or matrix folders (veil attack --matrix --out)")
    p.add_argument("--out", metavar="DIR", help="where to write report.html, report.md and figures (default: the first RUN_DIR)")
    p.add_argument("--images", type=int, default=8, metavar="N", help="users' images shown in Figures 4 and 5 (default 8)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="train and attack one run per lambda; plot the utility-privacy frontier (resumable)")
    p.add_argument("--config", required=True, help="YAML config file shared by every run")
    p.add_argument("--lambdas", required=True, metavar="L1,L2,...", help="defence strengths, e.g. 0,0.1,0.3,1,3 (lambda of Eq. 2)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory: one run directory per strength, frontier.csv/png")
    p.add_argument("--defence", default="adversarial", help="defence whose strength is swept (default: adversarial, the paper's)")
    p.add_argument("--attack", action="append", default=[], metavar="KEY=VALUE",
                   help="a veil attack setting for every point, e.g. --attack max_epochs=5 --attack attackers=simrec,resrec (see veil attack --help)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides passed to every run")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    from veil.attack import AttackError
    from veil.config import ConfigError
    from veil.data import DataError
    from veil.io import CheckpointError
    from veil.report import ReportError
    from veil.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, AttackError, ReportError) as e:
        print(f"veil {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"veil {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
