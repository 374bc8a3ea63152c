"""Correctness of the GPU paths, for benchmarks/gpu_check.sh (needs a CUDA device; prints JSON).

    no_sync_per_step   a training phase-epoch makes as many host syncs with 2 batches as with 6
                       (torch.cuda.set_sync_debug_mode counts them): none inside the step
    bf16               bf16 autocast against fp32 on one batch at width 0.25: loss and gradient
                       direction per network; weights and BatchNorm stay float32
    channels_last      channels_last against contiguous, both against a float64 reference
    compile            one pretraining epoch compiled against eager: the same loss within 1e-2
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from veil import config as config_mod
from veil.data import ImageSet, to_float
from veil.metrics import psnr
from veil.models import build_networks
from veil.runtime import Runtime, prepare_networks, wrap_networks
from veil.train import PHASE_A, PRETRAIN, Step, make_optimizers, train_obfuscator_classifier

DEV = torch.device("cuda")


def synthetic(n: int) -> ImageSet:
    g = torch.Generator(device=DEV).manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=DEV, generator=g)
    return ImageSet(images, torch.randint(0, 10, (n,), device=DEV, generator=g), [str(i) for i in range(10)])


def setup(cfg: config_mod.Config, rt: Runtime, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    nets = build_networks(cfg.model, 3, 10)
    prepare_networks(nets, rt)
    for net in nets.values():
        net.to(dtype)
    return nets, make_optimizers(nets, cfg.train)


def gradients(cfg: config_mod.Config, rt: Runtime, data: ImageSet, dtype: torch.dtype = torch.float32) -> tuple[float, dict]:
    nets, _ = setup(cfg, rt, dtype)
    x = to_float(data.images[:128], rt.memory_format).to(dtype)
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    with rt.autocast():
        z = f(x)
        loss = F.cross_entropy(g(z), data.labels[:128]) + psnr(x, r(z)).mean()
    loss.backward()
    return loss.item(), {f"{n}.{k}": p.grad.double() for n, net in nets.items() for k, p in net.named_parameters()}


def per_network(a: dict, b: dict) -> dict:
    out = {}
    for net in ("obfuscator", "classifier", "reconstructor"):
        x, y = (torch.cat([g[k].flatten() for k in g if k.startswith(net)]) for g in (a, b))
        out[net] = {"cosine": F.cosine_similarity(x, y, dim=0).item(), "relative_error": ((x - y).norm() / x.norm()).item()}
    return out


def count_syncs(cfg: config_mod.Config, n_batches: int) -> int:
    rt = Runtime(DEV)
    nets, opts = setup(cfg, rt)
    data = synthetic(n_batches * cfg.train.batch_size)
    gen = torch.Generator(device=DEV).manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_obfuscator_classifier(nets, opts[PHASE_A], data, True, cfg, gen, Step(PHASE_A, 1, 1), 1.0, rt=rt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> int:
    cfg = config_mod.apply_overrides(config_mod.Config(), ["width=0.25", "batch_size=128", "device=cuda", "progress=false", "dropout=0"])
    data = synthetic(1024)
    out: dict = {"device": torch.cuda.get_device_name(DEV), "torch_version": torch.__version__}
    ok = True

    syncs = {n: count_syncs(cfg, n) for n in (2, 6)}
    out["no_sync_per_step"] = {"syncs_2_batches": syncs[2], "syncs_6_batches": syncs[6], "ok": syncs[2] == syncs[6]}

    loss32, g32 = gradients(cfg, Runtime(DEV), data)
    loss16, g16 = gradients(cfg, Runtime(DEV, precision="bf16"), data)
    nets, _ = setup(cfg, Runtime(DEV, precision="bf16"))
    fp32_state = all(t.dtype == torch.float32 for net in nets.values() for t in net.state_dict().values() if t.is_floating_point())
    bf16 = per_network(g32, g16)
    out["bf16"] = {"loss_fp32": loss32, "loss_bf16": loss16, "per_network": bf16, "weights_and_batchnorm_fp32": fp32_state,
                   "ok": abs(loss16 - loss32) < 0.02 * abs(loss32) and fp32_state and all(v["cosine"] > 0.9 for v in bf16.values())}

    _, g64 = gradients(cfg, Runtime(DEV), data, torch.float64)
    _, gcl = gradients(cfg, Runtime(DEV, channels_last=True), data)
    contiguous, nhwc = per_network(g64, g32), per_network(g64, gcl)
    out["channels_last"] = {"contiguous_vs_fp64": contiguous, "channels_last_vs_fp64": nhwc,
                            "ok": all(v["relative_error"] < 1e-2 for v in nhwc.values())}

    losses, seconds = {}, {}
    for compiled in (False, True):
        rt = Runtime(DEV, precision="bf16", channels_last=True, compile=compiled)
        nets, opts = setup(cfg, rt)
        wrap_networks(nets, rt)
        start = time.perf_counter()
        rec = train_obfuscator_classifier(nets, opts[PRETRAIN], data, True, cfg, torch.Generator(device=DEV).manual_seed(2), Step(PRETRAIN, 0, 1), 0.0, rt=rt)
        seconds[compiled], losses[compiled] = time.perf_counter() - start, rec["loss"]
    out["compile"] = {"loss_eager": losses[False], "loss_compiled": losses[True], "first_epoch_seconds_eager": seconds[False],
                      "first_epoch_seconds_compiled": seconds[True], "ok": abs(losses[True] - losses[False]) < 1e-2 * abs(losses[False])}

    ok = all(v["ok"] for v in out.values() if isinstance(v, dict))
    out["ok"] = ok
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
