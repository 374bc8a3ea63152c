"""`veil <command>`: each subcommand parses its arguments and calls one function.

Veil's own modules are imported inside the functions below, each where it is needed, on purpose:
`veil --help` or `veil verify` should not wait for training, attacks and reports to import. This
file is the only one in veil/ that does so (tests/test_layout.py checks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from veil import config as config_mod
    from veil.train import train

    if args.help_config:
        print(config_mod.describe_keys())
        return 0
    if args.nproc < 1:
        raise config_mod.ConfigError(f"--nproc must be >= 1 (processes to train with), got {args.nproc}")
    if args.resume and (args.config or args.out):
        given = f"--config {args.config}" if args.config else f"--out {args.out}"
        raise config_mod.ConfigError(f"--resume {args.resume} continues that run with its own config.yaml, in its own folder; it takes no {given} "
                                     f"(KEY=VALUE may change only how it runs)")
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
            allowed = config_mod.RESUME_MAY_CHANGE
            changed = config_mod.changed_keys(config_mod.to_dict(original), config_mod.to_dict(cfg), allowed)
            if changed:
                raise config_mod.ConfigError(f"cannot resume with another config ({'; '.join(changed)}); only {', '.join(sorted(allowed))} may differ")
    else:
        if not args.config or not args.out:
            raise config_mod.ConfigError("veil train needs --config FILE and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = config_mod.load(args.config, args.overrides)
        run_dir = Path(args.out)
    summary = train(cfg, run_dir, resume=bool(args.resume), tensorboard=args.tensorboard)
    if summary:  # only process 0 of a multi-process run returns one
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


def print_summary(summary: dict) -> None:
    from veil.attack.results import db, pct
    from veil.defences import DEFENCES

    print()
    defence = summary.get("defence", "adversarial")
    strength = DEFENCES[defence].strength_label if defence in DEFENCES and DEFENCES[defence].strength_key else None
    print("                         test accuracy   reconstruction PSNR (training reconstructor)")
    print(f"before {defence:<17} {pct(summary['pretrain_test_accuracy']):>13}   {db(summary['undefended_test_psnr'], unit=' dB')}")
    print(f"after {defence:<18} {pct(summary['final_test_accuracy']):>13}   {db(summary['final_test_psnr'], unit=' dB')}")
    setting = f"{strength} {summary.get('strength')}, " if strength else ""
    print(f"({defence}: {setting}reconstructor {summary['reconstructor']}, {summary['seconds']:.0f} s of training)")


def cmd_obfuscate(args: argparse.Namespace) -> int:
    from veil.errors import StoreError
    from veil.store.obfuscate import obfuscate

    if (args.out or "").startswith("memory://"):
        raise StoreError(f"{args.out}: a memory:// store lives inside one process and would vanish when veil exits; give a folder or an object store URL")
    r = obfuscate(args.run, args.data, args.out, dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size,
                  name=args.name, device=args.device, progress=not args.no_progress, bench=args.bench, append=args.append, id_map=args.id_map,
                  client=args.client)
    if args.append:
        print(f"appended {r['written']} items to {args.append} in {r['seconds']:.2f} s; it holds {r['items']} items in {r['shards']} shards")
    elif r["written"]:
        print(f"wrote {r['written']} of {r['items']} items to {args.out} in {r['seconds']:.2f} s ({r['written'] / r['seconds']:.0f} images/s; "
              f"{r['open_seconds']:.2f} s reading the source before); {r['shards']} shards, {r['bytes'] / r['items']:.0f} bytes per item")
    if "bare_seconds" in r and r["written"]:
        bare, rate = r["bare_images"] / r["bare_seconds"], r["written"] / r["seconds"]
        cpu_ratio = (r["written"] / r["cpu_seconds"]) / (r["bare_images"] / r["bare_cpu_seconds"])
        print(f"bare obfuscator forward on {r['bare_images']} of the same images: {bare:.0f} images/s; obfuscate runs at "
              f"{rate / bare:.2f}x of it ({cpu_ratio:.2f}x counting CPU time)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from veil.client.export import export_client

    export_client(args.run, args.out, input_kind=args.input, precision=args.precision, calibration=args.calibration, check=args.check)
    return 0


def cmd_store_export(args: argparse.Namespace) -> int:
    from veil.store.export import export_store

    r = export_store(args.store, args.out, fmt=args.format, progress=not args.no_progress)
    print(f"wrote {r['rows']} rows of {args.store} to {args.out} ({r['bytes'] / 1e6:.2f} MB, {r['format']}); "
          f"after a veil erase, export again: this copy keeps the erased items")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from veil.store.classify import HeadConfig, train_classifier

    cfg = HeadConfig(**{k: getattr(args, k) for k in HeadConfig.__dataclass_fields__ if k != "progress"}, progress=not args.no_progress)
    summary = train_classifier(args.store, args.out, cfg, test_store=args.test_store, val_store=args.val_store)
    kept = f"epoch {summary['kept_epoch']} of {summary['epochs']}, picked on {summary['val_items']} validation items" if args.val_store else f"{summary['epochs']} epochs"
    if summary["kept_test_accuracy"] is not None:
        print(f"test accuracy {summary['kept_test_accuracy']:.2%} on {summary['test_items']} items of {args.test_store} "
              f"(head {summary['head']}, {kept}, {summary['seconds']:.0f} s)")
    elif args.val_store:
        print(f"kept the head of {kept} (validation accuracy {summary['kept_val_accuracy']:.2%})")
    return 0


def cmd_growth(args: argparse.Namespace) -> int:
    from veil.store.growth import RESULT, TABLE, GrowthConfig, growth

    settings = GrowthConfig(epochs=args.epochs, heads=args.head, batch_size=args.batch_size, out=args.out or "", image_dir=args.image_dir or "",
                            validation=args.validation, keep_stores=args.keep_stores, seed=args.seed, device=args.device, progress=not args.no_progress)
    growth(args.run, settings)
    out = Path(args.out) if args.out else Path(args.run) / "growth"
    print()
    print((out / TABLE).read_text())
    print(f"written to {out}/ ({RESULT}, {TABLE}, classifiers/)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from veil.errors import StoreError
    from veil.store.classify import accuracy_of, predict

    if args.show < -1:
        raise StoreError(f"--show must be -1 (all) or a count >= 0, got {args.show}")
    predictions = predict(args.run, images=args.images, store=args.store, classifier=args.classifier, device=args.device)
    shown = predictions if args.show < 0 else predictions[: args.show]
    width = max([len("item")] + [len(p.item) for p in shown])
    if shown:
        print(f"{'item':<{width}}  {'class':<12} confidence")
    for p in shown:
        print(f"{p.item:<{width}}  {p.name:<12} {p.confidence:>9.1%}")
    if 0 <= args.show < len(predictions):
        print(f"... {len(predictions) - args.show} more (--show -1 prints all)")
    if args.csv:
        from veil.io import atomic_write_text

        rows = ["item,class,label,confidence,true_label"] + [f"{p.item},{p.name},{p.label},{p.confidence:.6f},{'' if p.true_label is None else p.true_label}" for p in predictions]
        atomic_write_text(args.csv, "\n".join(rows) + "\n")
    acc = accuracy_of(predictions)
    if acc is not None:
        print(f"accuracy against the store's labels: {acc:.2%} ({len(predictions)} items)")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from veil.store.erase import erase, parse_ids

    r = erase(args.store, parse_ids(args.ids), id_map=args.id_map, items=args.items, progress=not args.no_progress)
    for i, utc in sorted(r["already"].items()):
        print(f"{i}: already erased on {utc}")
    if r["cleaned"]:
        print(f"removed {r['cleaned']} file(s) left by an interrupted erase or append")
    if r["erased"]:
        print(f"erased {r['erased']} items from {args.store} in {r['seconds']:.2f} s ({r['shards_rewritten']} shards rewritten); "
              f"{r['items']} items remain; the erasure log in its manifest lists the ids")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from veil.store.format import leftovers, store_bytes, verify

    fp = None
    if args.run:
        from veil.models.obfuscator import fingerprint
        from veil.rundir import load_run

        fp = fingerprint(load_run(args.run).obfuscator)
    m = verify(args.store, fingerprint=fp, progress=not args.no_progress)
    print(f"{args.store}: OK, {m['count']} items in {len(m['shards'])} shards, {store_bytes(args.store, m) / max(1, m['count']):.0f} bytes per item; "
          f"{m['dataset']['name']} ({m['dataset']['split']}), {len(m['dataset']['classes'])} classes, features {'x'.join(map(str, m['features']['shape']))} "
          f"{m['features']['dtype']}, obfuscator {m['obfuscator']['fingerprint'][:16]}...{' (matches ' + args.run + ')' if args.run else ''}")
    if m["erasures"]:
        print(f"erasure log: {sum(len(e['ids']) for e in m['erasures'])} ids erased in {len(m['erasures'])} erasures, none of them in a shard")
    left = leftovers(args.store, m)
    if left:
        print(f"note: {len(left)} file(s) left by an interrupted change ({left[0]}{', ...' if len(left) > 1 else ''}), not part of the store; "
              f"the next veil erase or veil obfuscate --append deletes them")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from veil.report.sections import report

    report(args.run_dirs, args.out, n_images=args.images)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from veil.attack.results import db, pct
    from veil.report.frontier import cap_mark
    from veil.sweep import parse_attack_settings, parse_store_settings, parse_strengths, sweep

    if (Path(args.out) / "config.yaml").is_file():
        from veil.errors import ConfigError

        raise ConfigError(f"--out {args.out}: holds a run (config.yaml), not a sweep; give the sweep a folder of its own")
    settings = parse_attack_settings(args.attack)
    rows = sweep(args.config, parse_strengths(args.lambdas), args.out, args.overrides, defence=args.defence, attack_settings=settings,
                 store_epochs=args.store_classifier, store_settings=parse_store_settings(args.store), share_pretraining=not args.no_fork,
                 growth_epochs=args.growth, growth_heads=args.growth_head,
                 growth_validation=args.growth_validation)
    if rows:
        stored = any(r["store_accuracy"] is not None for r in rows)
        grown = any(r["growth_accuracy_at_n"] is not None for r in rows)
        print()
        print(f"{'point':<16}{'test accuracy':>15}" + (f"{'store classifier':>18}" if stored else "") + (f"{'growth ratio':>14}" if grown else "")
              + f"{'strongest PSNR':>30}{'strongest SSIM':>26}{'strongest re-id top-1':>34}{'linkage':>9}{'cost':>9}")
        ssim = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        who = lambda name: f" ({name})" if name else ""  # noqa: E731  the attacker each strongest figure came from
        for r in rows:  # the points, then the image, label and logits stores (reference rows)
            cost = "n/a" if r["seconds"] is None else f"{r['seconds']:.0f} s"
            ratio = "n/a" if r["growth_ratio"] is None else f"{r['growth_ratio']:.2f}"
            print(f"{r['name']:<16}{pct(r['test_accuracy']):>15}" + (f"{pct(r['store_accuracy']):>18}" if stored else "") + (f"{ratio:>14}" if grown else "")
                  + f"{db(r['psnr'], unit=' dB') + cap_mark(r) + who(r['psnr_attacker']):>30}"
                  + f"{ssim(r['ssim']) + who(r['ssim_attacker']):>26}"
                  + f"{pct(r['reid_top1'], 1) + who(r['reid_attacker']):>34}{pct(r['linkage_top1'], 1):>9}{cost:>9}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from veil.attack.harness import attack, attack_dir, attack_matrix
    from veil.attack.settings import AttackConfig, resolve_settings
    from veil.attack.tables import format_table
    from veil.config import ConfigError

    if bool(args.run_dir) == bool(args.matrix):
        raise ConfigError("veil attack needs one RUN_DIR, or --matrix RUN_A RUN_B ... (not both)")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in 0..2**32-1, got {args.seed}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AttackConfig) if getattr(args, f.name) is not None}
    settings = resolve_settings(given)
    if args.matrix:
        attack_matrix(args.matrix, settings, args.out)
        print()
        print(Path(args.out, "matrix.md").read_text())
        return 0
    result = attack(args.run_dir, settings)
    print()
    print(format_table(result))
    print(f"\nwritten to {attack_dir(args.run_dir, settings)}/ (attack.json, attack.csv, attack.md, one PNG per attacker)")
    return 0


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a settings dataclass, its docstring as help; unset flags stay None."""
    from veil.config import field_docs

    docs, hints, defaults = field_docs(cls), typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        flag, help_text = "--" + f.name.replace("_", "-"), f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)})".replace("%", "%%")  # argparse %-formats help
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=hints[f.name], default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from veil.version import __version__

    parser = argparse.ArgumentParser(prog="veil", description="Privacy-preserving image classification with a learnable obfuscator.")
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run Algorithm 1 into a run directory (resumable)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last finished phase-epoch")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--nproc", type=int, default=1, help="train with N processes (torchrun on this machine: one per GPU, or N CPU processes)")
    p.add_argument("--tensorboard", action="store_true", help="also log scalars and reconstructions to RUN_DIR/tensorboard (needs the tensorboard package)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. train.lambda_privacy=0 or width=0.25")
    p.set_defaults(func=cmd_train)

    from veil.store.format import DTYPES
    from veil.store.obfuscate import SPEC_HELP

    p = sub.add_parser("obfuscate", help="images -> a feature store (no pixels, no file names); resumable")
    p.add_argument("--run", help="run directory whose obfuscator to use")
    p.add_argument("--client", metavar="FILE.onnx", help="instead of --run: a client file of veil export, run with onnxruntime (no PyTorch weights); "
                   "its stores mix with --run's of the same obfuscator")
    p.add_argument("--data", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--out", metavar="STORE", help="store to create (a folder or an fsspec URL such as s3://bucket/store), or to finish after an interruption")
    p.add_argument("--append", metavar="STORE", help="add the images to this existing store instead, as new shards (same obfuscator, classes and feature shape)")
    p.add_argument("--id-map", metavar="FILE", help="also write which source item (file path, or SPEC#INDEX) got which id, to FILE outside the store "
                   "(for erasure requests; keep it with the images, not with the store)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="how features are kept (default auto: a quantising obfuscator's integer codes, else float16)")
    p.add_argument("--shard-size", type=int, default=4096, help="items per shard file (default 4096); memory holds one shard")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    p.add_argument("--name", default="", help="dataset name for the manifest (default: the named dataset, or 'npz'/'folder')")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--bench", action="store_true", help="also time a bare forward pass of the obfuscator on the same images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_obfuscate)

    p = sub.add_parser("export", help="the run's final obfuscator alone as ONNX, for the device (no classifier, no reconstructor); checked against PyTorch")
    p.add_argument("run", metavar="RUN", help="a run directory (veil train)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the client file; FILE.onnx.parity.json gets the comparison with PyTorch")
    p.add_argument("--input", default="uint8", choices=["uint8", "float"], help="what the client takes: uint8 N x C x S x S images 0..255 "
                   "(default), or float32 in [0, 1]")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="int8: onnxruntime static quantisation, calibrated on "
                   "defender images; its codes get a fingerprint of their own (default fp32)")
    p.add_argument("--calibration", type=int, default=512, metavar="N", help="defender images an int8 client is calibrated on (default 512)")
    p.add_argument("--check", type=int, default=0, metavar="N", help="users' images (test split) compared with PyTorch (default 0: all)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("store-export", help="a store as one file other engines read (parquet: pandas, DuckDB, Spark, datasets)")
    p.add_argument("store", metavar="STORE", help="a complete store (a folder or an fsspec URL)")
    p.add_argument("out", metavar="OUT", help="the file to write (local), e.g. store.parquet")
    p.add_argument("--format", default="parquet", choices=["parquet"], help="the file format (default parquet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_store_export)

    from veil.config import field_docs
    from veil.store.classify import HEADS, HeadConfig

    p = sub.add_parser("train-classifier", help="train a classifier from a feature store alone")
    p.add_argument("store", help="store made by veil obfuscate (e.g. from the defender split)")
    p.add_argument("--out", required=True, metavar="DIR", help="classifier directory to create")
    p.add_argument("--test-store", help="store of test images (same obfuscator) to report accuracy on")
    p.add_argument("--val-store", help="store of validation images (same obfuscator; e.g. veil obfuscate --data run:validation): keep the head "
                   "of the epoch that reads it best, not the last one")
    docs = field_docs(HeadConfig)
    for name, f in HeadConfig.__dataclass_fields__.items():
        if name != "progress":
            p.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default, choices=list(HEADS) if name == "head" else None,
                           metavar="PIXELS" if name == "shift" else None, help=f"{docs.get(name, '')} (default {f.default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("growth", help="does a store grow? classifiers on N and N + M stored items beside the image and label stores (resumable)")
    p.add_argument("run", metavar="RUN", help="a finished run directory; needs later images (data.n_defender / data.n_attacker leave some)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every classifier, the store classifiers' and the image store's (default 30)")
    p.add_argument("--head", default="vgg16", metavar="H1,H2,...", help=f"store classifier heads, comma-separated, of {', '.join(HEADS)} (default vgg16)")
    p.add_argument("--batch-size", type=int, default=128, help="items per optimisation step of every classifier (default 128)")
    p.add_argument("--out", metavar="DIR", help="where to measure (default RUN/growth): inputs.json, classifiers/, growth.json, growth.md")
    p.add_argument("--image-dir", metavar="DIR", help="folder of the image store's classifiers (default DIR/classifiers); runs on the same data and "
                   "settings can share one: the image store does not depend on the obfuscator")
    p.add_argument("--validation", action="store_true", help="score every classifier (store, image and logits store) at the epoch that reads "
                   "the validation split best (the test images data.n_test leaves out of the users'), not at its last epoch")
    p.add_argument("--keep-stores", action="store_true", help="keep the stores in DIR/stores (default: deleted at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of every classifier (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_growth)

    p = sub.add_parser("predict", help="class and confidence of new images, or of a store's items")
    p.add_argument("--run", required=True, help="run directory: its obfuscator (and, unless --classifier, its classifier)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    p.add_argument("--store", help="classify a store's items instead of images (refused if another obfuscator made it)")
    p.add_argument("--classifier", metavar="DIR", help="a classifier made by veil train-classifier, instead of the run's own")
    p.add_argument("--show", type=int, default=20, help="print at most this many predictions (-1 = all; default 20)")
    p.add_argument("--csv", help="write every prediction to this CSV file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("erase", help="remove items from a store by id (an erasure request); logged in the manifest")
    p.add_argument("store", help="store (a folder or an fsspec URL)")
    p.add_argument("--ids", nargs="+", default=[], metavar="ID|FILE", help="ids (32 hex digits), or files of ids, one per line")
    p.add_argument("--id-map", metavar="FILE", help="the id map `veil obfuscate --id-map` wrote for this store: resolves --items, and loses the erased items' lines")
    p.add_argument("--items", nargs="+", default=[], metavar="ITEM", help="source items to erase, as the id map names them (file path, or SPEC#INDEX)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("verify", help="recompute a store's checksums and check its manifest")
    p.add_argument("store", help="store (a folder or an fsspec URL)")
    p.add_argument("--run", help="also check that this run's obfuscator made the store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

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


    p = sub.add_parser("report", help="tables and figures of runs or sweeps as one HTML page and Markdown")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (veil train), sweep directories (veil sweep) or matrix folders (veil attack --matrix --out)")
    p.add_argument("--out", metavar="DIR", help="where to write report.html, report.md and figures (default: the first RUN_DIR)")
    p.add_argument("--images", type=int, default=8, metavar="N", help="users' images shown in Figures 4 and 5 (default 8)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="train and attack one run per lambda; plot the utility-privacy frontier (resumable)")
    p.add_argument("--config", required=True, help="YAML config file shared by every run")
    p.add_argument("--lambdas", required=True, metavar="L1,L2,...", help="defence strengths, e.g. 0,0.1,0.3,1,3: the strength key of --defence (lambda of Eq. 2, NoPeek's alpha, the noise sigma, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory: one run directory per strength, frontier.csv/png")
    from veil.defences import DEFENCES

    p.add_argument("--defence", default="adversarial", choices=list(DEFENCES),
                   help="defence whose strength is swept (veil/defences/; default: adversarial, the paper's); several may share one --out")
    p.add_argument("--attack", action="append", default=[], metavar="KEY=VALUE",
                   help="a veil attack setting for every point, e.g. --attack max_epochs=5 --attack attackers=simrec,resrec (see veil attack --help)")
    p.add_argument("--store-classifier", type=int, default=0, metavar="EPOCHS",
                   help="also store each point's defender and test images as features and train a classifier from scratch "
                        "on them for EPOCHS epochs (veil obfuscate + veil train-classifier): the accuracy a feature store's "
                        "user gets, beside the in-run one (default 0: not done; 30 is train-classifier's default)")
    p.add_argument("--store", action="append", default=[], metavar="KEY=VALUE",
                   help="a veil train-classifier setting for --store-classifier, e.g. --store shift=0 --store head=small "
                        "(see veil train-classifier --help; shift in pixels, default 4); a point's store classifier made with "
                        "other settings is trained again")
    p.add_argument("--growth", type=int, default=0, metavar="EPOCHS",
                   help="also measure each point's growth (veil growth RUN --epochs EPOCHS: store classifiers on the N defender and "
                        "N + M defender + later items, beside the image store, trained once for the sweep, and the label store); "
                        "the frontier then shows each point's growth ratio (default 0: not done)")
    p.add_argument("--growth-head", default="vgg16", metavar="H1,H2,...", help="store classifier heads of --growth (default vgg16)")
    p.add_argument("--growth-validation", action="store_true", help="--growth scores every classifier at the epoch that reads the validation "
                   "split best (veil growth --validation)")
    p.add_argument("--no-fork", action="store_true",
                   help="pretrain every point itself (default: a point whose pretraining another point of the sweep already did "
                        "starts from that one's, bit for bit the same; see forked.json in its run directory)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides passed to every run")
    p.set_defaults(func=cmd_sweep)

    from veil.attack.settings import AttackConfig

    p = sub.add_parser("attack", help="Chosen Image Attack on a run: fresh attackers, white-box inversion, floor and ceiling")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory to attack; results go to RUN_DIR/attack/")
    p.add_argument("--matrix", nargs="+", metavar="RUN_DIR", help="attack several runs and write the attack x training reconstructor matrix (Table 3)")
    p.add_argument("--out", default="attack-matrix", help="folder for matrix.json/.csv/.md with --matrix (default: attack-matrix)")
    add_dataclass_flags(p, AttackConfig)
    p.set_defaults(func=cmd_attack)
    return parser


def main(argv: list[str] | None = None) -> int:
    from veil.data import DataError
    from veil.errors import AttackError, ClientError, ConfigError, ReportError, StoreError, TrainingError
    from veil.io import CheckpointError
    from veil.train import Stopped

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may also come after an option (`train --config c a=1 --out D b=2`)
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, StoreError, ReportError, AttackError, ClientError) as e:
        print(f"veil {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder: the message names the file
        print(f"veil {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # SIGTERM/SIGINT after a saved phase-epoch: the shell's 128 + signal number
        print(f"veil {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"veil {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
