import json

import pytest

from veil import bench as bench_mod
from veil.bench import PHASES, Phase, format_table
from veil.cli import main
from veil.config import Config


def test_bench_json_reports_every_phase_beside_the_bare_loop(capsys):
    code = main(["bench", "width=0.0625", "batch_size=16", "eval_batch_size=32", "device=cpu", "--batches", "2", "--repeats", "1", "--warmup", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert tuple(result["phases"]) == PHASES
    for name, p in result["phases"].items():
        assert p["images_per_s"] > 0 and p["bare_images_per_s"] > 0, name
    flops = {name: p["flop_per_image"] for name, p in result["phases"].items()}
    # Obfuscator at width 1/16 on 32x32x3, by hand: 2*H*W*Cin*Cout*9 per 3x3 convolution.
    by_hand = 2 * 9 * (32 * 32 * (3 * 4 + 4 * 4) + 16 * 16 * (4 * 8 + 8 * 8))
    assert flops["obfuscate"] == by_hand
    assert flops["obfuscate"] < flops["evaluate"] < flops["obfuscator_classifier"]
    assert flops["pretrain"] < flops["obfuscator_classifier"]  # phase (a) adds the reconstructor
    assert (result["batch_size"], result["precision"], result["channels_last"]) == (16, "fp32", True)  # NHWC: on by default on a CPU
    assert "obfuscator_classifier" in format_table(result)


def test_bench_rejects_unknown_phase(capsys):
    assert main(["bench", "width=0.0625", "device=cpu", "--phases", "pretrain,nonsense"]) == 2
    assert "unknown phase(s) nonsense; valid: pretrain, obfuscator_classifier" in capsys.readouterr().err


class FakeClock:
    """perf_counter and process_time that move only when a fake phase runs."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu


def test_bench_figures_are_medians_of_the_measured_passes(monkeypatch):
    """Known pass times through a fake clock: the figures are the medians of the timed passes (the
    warm-up pass excluded), and ratio = Veil's rate / the bare rate. Times are binary fractions,
    so every sum and difference is exact."""
    clock = FakeClock()

    def ticking(times: list[tuple[float, float]]):  # noqa: ANN202
        passes = iter(times)

        def run() -> None:
            wall, cpu = next(passes)
            clock.wall += wall
            clock.cpu += cpu

        return run

    # (wall s, CPU s) per pass: first the warm-up (never timed), then three timed passes.
    veil = ticking([(64.0, 64.0), (0.5, 0.375), (1.0, 0.75), (0.25, 0.25)])  # medians 0.5, 0.375
    bare = ticking([(64.0, 64.0), (0.25, 0.125), (0.125, 0.0625), (0.375, 0.25)])  # medians 0.25, 0.125
    monkeypatch.setattr(bench_mod, "time", clock)
    monkeypatch.setattr(bench_mod, "build_phases", lambda cfg, rt, n: {"pretrain": Phase(veil, bare, 64, 1000.0)})
    result = bench_mod.bench(Config(device="cpu"), n_batches=2, repeats=3, warmup=1, phases=("pretrain",), progress=False)
    p = result["phases"]["pretrain"]
    assert p["images_per_s"] == 64 / 0.5 and p["bare_images_per_s"] == 64 / 0.25
    assert p["ratio"] == 0.5  # Veil at half the bare loop's rate
    assert p["cpu_ratio"] == pytest.approx(0.125 / 0.375) and p["bare_images_per_cpu_s"] == 64 / 0.125
    assert p["flop_per_s"] == 1000.0 * 64 / 0.5
    assert (result["repeats"], result["warmup"], result["batches"]) == (3, 1, 2)


@pytest.mark.parametrize("cpu, precision, peak, unit", [
    ({"vendor_id": "GenuineIntel", "cpu family": "6"}, "fp32", 2 * 3.0 * 64, "AVX-512"),  # two 512-bit FMA pipes
    ({"vendor_id": "AuthenticAMD", "cpu family": "25"}, "fp32", 2 * 3.0 * 32, "AVX-512"),  # Zen 4: 512 bits as two halves
    ({"vendor_id": "AuthenticAMD", "cpu family": "25"}, "bf16", 2 * 3.0 * 64, "AVX-512 BF16"),
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "amx": True}, "bf16", 2 * 3.0 * 1024, "AMX"),
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "avx2_only": True}, "fp32", 2 * 3.0 * 32, "AVX2"),
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "avx2_only": True}, "bf16", 2 * 3.0 * 32, "no native bf16"),
])
def test_the_cpu_peak_follows_the_units_found(monkeypatch, cpu, precision, peak, unit):
    from veil import runtime

    amx, avx2_only = cpu.pop("amx", False), cpu.pop("avx2_only", False)
    found = {"avx512": not avx2_only, "avx2": True, "amx_tile": amx, "avx512_bf16": not avx2_only}
    monkeypatch.setattr(runtime, "_cpu_check", lambda name: found.get(name, False))
    monkeypatch.setattr(bench_mod, "_cpuinfo", lambda: {**cpu, "model name": "a test CPU"})
    monkeypatch.setattr(bench_mod, "_clock_ghz", lambda info: 3.0)
    p = bench_mod.cpu_peak(precision, 2)
    assert p["gflops"] == pytest.approx(peak) and unit in p["how"] and p["how"].startswith("2 cores x 3.00 GHz")
    monkeypatch.setattr(bench_mod, "_clock_ghz", lambda info: None)
    assert bench_mod.cpu_peak(precision, 2)["gflops"] is None  # no clock, no peak: the column stays empty
