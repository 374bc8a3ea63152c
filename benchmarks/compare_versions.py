"""Throughput of two versions of Veil's default training path, in one process, interleaved.

    git worktree add /tmp/veil-before <commit>          # the older version's source
    python benchmarks/compare_versions.py /tmp/veil-before/src src width=0.25 --batches 8 --repeats 5

Both versions are imported into this process (the first, then the second under fresh module
entries; each keeps its own functions), get the same config, the same synthetic uint8 data and
identically initialised networks, and run the same phase functions with their default options
(the older signature: no runtime argument). Passes alternate between the versions so that load
on a shared machine hits both alike; the median pass time is reported per phase, with the ratio
new / old of images per second, in wall time and in process CPU time (steadier on a shared
machine with --threads 1). The weights after one pretraining pass are compared too: the
two versions must train the same model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time

import torch


def load_veil(src: str) -> dict:
    """Import the `veil` package found in `src` and return the modules this script uses."""
    for name in [m for m in sys.modules if m == "veil" or m.startswith("veil.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        mods = {name: importlib.import_module(f"veil.{name}") for name in ("config", "data", "models", "train")}
    finally:
        sys.path.remove(src)
    return mods


def phases(v: dict, overrides: list[str], n_batches: int) -> tuple[dict, dict]:
    """The version's phase functions on its own networks and the shared synthetic data."""
    cfg = v["config"].apply_overrides(v["config"].Config(), overrides + ["device=cpu", "progress=false"])
    b = cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)
    data = v["data"].ImageSet(
        torch.randint(0, 256, (n_batches * b, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, 10, (n_batches * b,), generator=gen),
        [str(i) for i in range(10)],
    )
    torch.manual_seed(0)
    nets = v["models"].build_networks(cfg.model, 3, 10)
    t = v["train"]
    opts = t.make_optimizers(nets, cfg.train)

    def g(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def factor(i: int) -> float:
        return t.onecycle_factor(i, n_batches)

    calls = {
        "pretrain": lambda: t.train_obfuscator_classifier(nets, opts[t.PRETRAIN], data, True, cfg, g(1), t.Step(t.PRETRAIN, 0, 1), 0.0, factor),
        "obfuscator_classifier": lambda: t.train_obfuscator_classifier(nets, opts[t.PHASE_A], data, True, cfg, g(2), t.Step(t.PHASE_A, 1, 1), 1.0),
        "reconstructor": lambda: t.train_reconstructor(nets, opts[t.PHASE_B], data, True, cfg, g(3), t.Step(t.PHASE_B, 1, 1)),
        "obfuscator": lambda: t.train_obfuscator(nets, opts[t.PHASE_C], data, True, cfg, g(4), t.Step(t.PHASE_C, 1, 1)),
        "evaluate": lambda: t.evaluate(nets, data, cfg.train.eval_batch_size),
    }
    return calls, nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old_src")
    parser.add_argument("new_src")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    old, new = load_veil(args.old_src), load_veil(args.new_src)
    old_calls, old_nets = phases(old, args.overrides, args.batches)
    new_calls, new_nets = phases(new, args.overrides, args.batches)
    images = args.batches * old["config"].apply_overrides(old["config"].Config(), args.overrides).train.batch_size

    # Same model: one pretraining pass from the same start (and dropout seed) must give the same weights.
    torch.manual_seed(1)
    old_calls["pretrain"]()
    torch.manual_seed(1)
    new_calls["pretrain"]()
    worst = max(
        (a - b).abs().max().item()
        for name in old_nets
        for a, b in zip(old_nets[name].state_dict().values(), new_nets[name].state_dict().values())
        if a.is_floating_point()
    )
    results = {}
    for name in old_calls:
        old_calls[name](), new_calls[name]()  # warm-up
        times, cpu = {"old": [], "new": []}, {"old": [], "new": []}
        for k in range(args.repeats):
            for which in ("old", "new") if k % 2 == 0 else ("new", "old"):
                start, start_cpu = time.perf_counter(), time.process_time()
                (old_calls if which == "old" else new_calls)[name]()
                times[which].append(time.perf_counter() - start)
                cpu[which].append(time.process_time() - start_cpu)
        old_ips, new_ips = images / statistics.median(times["old"]), images / statistics.median(times["new"])
        cpu_ratio = statistics.median(cpu["old"]) / statistics.median(cpu["new"])
        results[name] = {"old_images_per_s": old_ips, "new_images_per_s": new_ips, "ratio": new_ips / old_ips, "cpu_ratio": cpu_ratio}
    out = {"phases": results, "max_weight_difference_after_one_pretrain_pass": worst, "threads": torch.get_num_threads(), "torch_version": torch.__version__}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'phase':<22} {'old img/s':>10} {'new img/s':>10} {'new/old':>8} {'new/old (CPU time)':>19}")
    for name, r in results.items():
        print(f"{name:<22} {r['old_images_per_s']:>10.1f} {r['new_images_per_s']:>10.1f} {r['ratio']:>8.3f} {r['cpu_ratio']:>19.3f}")
    print(f"largest weight difference after one pretraining pass from the same start: {worst:.3g}")


if __name__ == "__main__":
    main()
