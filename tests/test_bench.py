import json

from veil.bench import PHASES, format_table
from veil.cli import main


def test_bench_json_reports_every_phase_beside_the_bare_loop(capsys):
    code = main(["bench", "width=0.0625", "batch_size=16", "eval_batch_size=32", "device=cpu", "--batches", "2", "--repeats", "1", "--warmup", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert tuple(result["phases"]) == PHASES
    for name, p in result["phases"].items():
        assert p["images_per_s"] > 0 and p["bare_images_per_s"] > 0, name
        assert abs(p["ratio"] - p["images_per_s"] / p["bare_images_per_s"]) < 1e-9
    flops = {name: p["flop_per_image"] for name, p in result["phases"].items()}
    # Obfuscator at width 1/16 on 32x32x3, by hand: 2*H*W*Cin*Cout*9 per 3x3 convolution.
    by_hand = 2 * 9 * (32 * 32 * (3 * 4 + 4 * 4) + 16 * 16 * (4 * 8 + 8 * 8))
    assert flops["obfuscate"] == by_hand
    assert flops["obfuscate"] < flops["evaluate"] < flops["obfuscator_classifier"]
    assert flops["pretrain"] < flops["obfuscator_classifier"]  # phase (a) adds the reconstructor
    assert (result["batch_size"], result["precision"], result["channels_last"]) == (16, "fp32", False)
    assert "obfuscator_classifier" in format_table(result)


def test_bench_rejects_unknown_phase(capsys):
    assert main(["bench", "width=0.0625", "device=cpu", "--phases", "pretrain,nonsense"]) == 2
    assert "unknown phase(s) nonsense; valid: pretrain, obfuscator_classifier" in capsys.readouterr().err
