"""veil export, veil obfuscate --client, the int8 client, and what a client file refuses."""

import json

import onnx
import pytest
import torch
from tests.conftest import read_all
from tests.store.test_export import check_file

from veil import config as config_mod
from veil.cli import main
from veil.client.export import export_client, parity_path
from veil.client.onnxfile import read_client
from veil.data import DataError, load_splits
from veil.errors import ClientError, StoreError
from veil.models.obfuscator import fingerprint
from veil.rundir import load_run
from veil.store.classify import HeadConfig, train_classifier
from veil.store.export import export_store
from veil.store.format import read_manifest, verify
from veil.store.obfuscate import obfuscate
from veil.train import train

QUIET = {"device": "cpu", "progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def coded(store_run, tmp_path_factory):
    """The tiny store run's settings with a 3-channel learned bottleneck and 2-bit codes, trained once."""
    d = config_mod.to_dict(store_run["cfg"])
    cfg = config_mod.from_dict({**d, "model": {**d["model"], "bottleneck": "learned", "bottleneck_channels": 3, "feature_bits": 2}})
    run_dir = tmp_path_factory.mktemp("coded") / "run"
    torch.manual_seed(0)
    train(cfg, run_dir, log=lambda *_: None)
    return {"run": run_dir, "cfg": cfg, "npz": store_run["npz"]}


def export(run_dir, out, **kw):
    return export_client(run_dir, out, log=lambda *_: None, **kw)


def test_a_float_client_matches_pytorch_and_its_stores_mix_with_run_stores(store_run, tmp_path):
    client = tmp_path / "client.onnx"
    result = export(store_run["run"], client)
    run = load_run(store_run["run"])
    meta = read_client(client).meta
    assert meta["veil_fingerprint"] == fingerprint(run.obfuscator) == result["fingerprint"]
    assert meta["veil_features"] == {"shape": [8, 8, 8], "dtype": "float16"} and meta["veil_input"] == "uint8"
    assert "path" not in meta["veil_data"] and meta["veil_data"]["dataset"] == "npz"  # no user's path travels with the client
    p = json.loads(parity_path(client).read_text())["against_pytorch"]
    assert p["items"] == 60 and p["items_equal_fraction"] >= 0.999 and p["max_abs_difference"] < 1e-2
    # No classifier or reconstructor in the file: its weights are the obfuscator's alone.
    n_weights = sum(onnx.numpy_helper.to_array(t).size for t in onnx.load(str(client)).graph.initializer)
    n_obfuscator = sum(t.numel() for t in run.obfuscator.state_dict().values())
    assert 0.5 * n_obfuscator < n_weights <= n_obfuscator + 100 < sum(p.numel() for p in run.classifier.parameters())

    spec = f"npz:{store_run['npz']}:test"
    with pytest.raises(DataError, match="a client holds no run"):
        obfuscate(None, "run:test", tmp_path / "x", client=client, **QUIET)
    obfuscate(None, spec, tmp_path / "by-client", client=client, **QUIET)
    obfuscate(store_run["run"], spec, tmp_path / "by-run", **QUIET)
    a, b = read_all(tmp_path / "by-client"), read_all(tmp_path / "by-run")
    assert torch.equal(a["labels"], b["labels"])
    gap = (a["features"].float() - b["features"].float()).abs()
    assert float(gap.max()) <= 2e-3 * float(b["features"].float().abs().max()) + 1e-3
    assert read_manifest(tmp_path / "by-client")["obfuscator"] == read_manifest(tmp_path / "by-run")["obfuscator"]
    # The same obfuscator either way: a run's items append to a client's store, and verify takes the run's fingerprint.
    obfuscate(store_run["run"], f"npz:{store_run['npz']}:attacker", append=tmp_path / "by-client", **QUIET)
    assert verify(tmp_path / "by-client", fingerprint=fingerprint(run.obfuscator))["count"] == 60 + len(load_splits(store_run["cfg"].data, 0).attacker)


def test_a_quantising_client_gives_pytorch_codes_and_the_same_store_classifier(coded, tmp_path):
    client = tmp_path / "codes.onnx"
    result = export(coded["run"], client)
    p = result["against_pytorch"]
    assert result["features"] == {"shape": [3, 8, 8], "dtype": "uint8", "bits": 2}
    assert p["values_differ_off_boundary"] == 0 and p["items_equal_fraction"] >= 0.99  # only a value on k + 1/2 may round either way
    stores = {}
    for how, kw in (("client", {"client": client}), ("run", {})):
        for split in ("defender", "test"):
            obfuscate(coded["run"] if how == "run" else None, f"npz:{coded['npz']}:{split}", tmp_path / f"{how}-{split}", **kw, **QUIET)
        stores[how] = read_all(tmp_path / f"{how}-defender", decode=False)["features"]
    assert stores["client"].dtype == torch.uint8 and int(stores["client"].max()) <= 3
    assert (stores["client"] == stores["run"]).float().mean() >= 0.999
    head = HeadConfig(head="vgg16", epochs=2, batch_size=16, device="cpu", progress=False, seed=0)
    accuracy = {how: train_classifier(tmp_path / f"{how}-defender", tmp_path / f"clf-{how}", head, test_store=tmp_path / f"{how}-test",
                                      log=lambda *_: None)["final_test_accuracy"] for how in ("client", "run")}
    if torch.equal(stores["client"], stores["run"]):  # equal codes: the same seeded classifier, to the last digit
        assert accuracy["client"] == accuracy["run"]
    assert abs(accuracy["client"] - accuracy["run"]) <= 0.05
    # The device's store travels as Parquet with its integer codes, as stored.
    table, meta = check_file(export_store(tmp_path / "client-test", tmp_path / "codes.parquet", progress=False)["path"], tmp_path / "client-test")
    assert str(table.schema.field("features").type.value_type) == "uint8" and meta["features"]["bits"] == 2


def test_a_float_input_client_gives_the_same_codes(coded, tmp_path):
    export(coded["run"], tmp_path / "u8.onnx")
    result = export(coded["run"], tmp_path / "f32.onnx", input_kind="float")
    assert read_client(tmp_path / "f32.onnx").meta["veil_input"] == "float" and result["against_pytorch"]["values_differ_off_boundary"] == 0
    users = load_splits(coded["cfg"].data, 0).test.images
    u8, f32 = read_client(tmp_path / "u8.onnx"), read_client(tmp_path / "f32.onnx")
    assert torch.equal(f32.run(users), f32.run(users.float() / 255))  # uint8 is scaled for it, floats in [0, 1] pass as they are
    assert (f32.run(users) == u8.run(users)).float().mean() >= 0.999
    with pytest.raises(ClientError, match="takes uint8 images 0..255, got torch.float32"):
        u8.run(users.float() / 255)


def test_an_int8_client_has_its_own_fingerprint_and_reports_its_agreement(coded, tmp_path):
    fp32, i8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export(coded["run"], fp32)
    result = export(coded["run"], i8, precision="int8", calibration=64)
    assert result["calibration_images"] == 64 and result["precision"] == "int8"
    assert result["fingerprint"] != result["source_fingerprint"] == fingerprint(load_run(coded["run"]).obfuscator)
    agree = result["against_pytorch"]["values_differ"] / result["against_pytorch"]["values"]
    assert 0 <= agree < 0.5  # int8 moves some codes, not most
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(i8)).graph.node)
    obfuscate(None, f"npz:{coded['npz']}:test", tmp_path / "s", client=fp32, **QUIET)
    with pytest.raises(StoreError, match=f"--client {i8}.*another obfuscator"):  # int8 codes never mix with the float client's
        obfuscate(None, f"npz:{coded['npz']}:defender", append=tmp_path / "s", client=i8, **QUIET)


def test_a_client_file_is_refused_when_foreign_altered_or_unsigned(coded, store_run, tmp_path):
    client = tmp_path / "c.onnx"
    export(coded["run"], client)
    proto = onnx.load(str(client))

    def save(p, name):
        onnx.save(p, tmp_path / name)
        return tmp_path / name

    altered = onnx.ModelProto()
    altered.CopyFrom(proto)
    w = next(t for t in altered.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    with pytest.raises(ClientError, match="altered.onnx: its graph or weights were changed"):
        read_client(save(altered, "altered.onnx"))
    for key, message in (("veil_fingerprint", "lacks veil_fingerprint"), ("veil_format", "not a Veil client")):
        unsigned = onnx.ModelProto()
        unsigned.CopyFrom(proto)
        kept = [p for p in unsigned.metadata_props if p.key != key]
        del unsigned.metadata_props[:]
        unsigned.metadata_props.extend(kept)
        with pytest.raises(ClientError, match=message):
            read_client(save(unsigned, f"no-{key}.onnx"))
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    next(p for p in bad.metadata_props if p.key == "veil_fingerprint").value = "not-a-fingerprint"
    with pytest.raises(ClientError, match="veil_fingerprint is not a sha256"):
        read_client(save(bad, "bad.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx at all")
    with pytest.raises(ClientError, match="junk.onnx: not a readable ONNX model"):
        read_client(tmp_path / "junk.onnx")
    # A client of another run cannot add to this run's store.
    obfuscate(store_run["run"], f"npz:{store_run['npz']}:test", tmp_path / "other", **QUIET)
    with pytest.raises(StoreError, match=f"--client {client}.*another obfuscator"):
        obfuscate(None, f"npz:{store_run['npz']}:test", append=tmp_path / "other", client=client, **QUIET)


def test_the_export_command_refuses_bad_input_in_one_line(coded, tmp_path, capsys):
    assert main(["export", str(coded["run"]), "--out", str(tmp_path / "c.txt")]) == 2
    assert "a client is an .onnx file" in capsys.readouterr().err
    assert main(["export", str(coded["run"]), "--out", str(tmp_path / "nowhere" / "c.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "c.onnx")]) == 2
    assert "not a Veil run directory" in capsys.readouterr().err
    assert main(["obfuscate", "--client", str(tmp_path / "missing.onnx"), "--data", "cifar10:test", "--out", str(tmp_path / "s")]) == 2
    assert "client file not found" in capsys.readouterr().err
    assert main(["obfuscate", "--data", "cifar10:test", "--out", str(tmp_path / "s")]) == 2
    assert "give --run RUN" in capsys.readouterr().err


def test_a_noisy_obfuscator_is_not_exported():
    from veil.client.model import ClientModel
    from veil.defences.noise import GaussianNoise
    from veil.models.obfuscator import Obfuscator

    with pytest.raises(ClientError, match="draws noise.*sigma 0.5"):
        ClientModel(Obfuscator(3, 0.0625, 2, tail=GaussianNoise(0.5)))
    quiet = ClientModel(Obfuscator(3, 0.0625, 2, tail=GaussianNoise(0.0)))  # sigma 0 adds nothing: exported without it
    assert not any(isinstance(m, GaussianNoise) for m in quiet.modules())


def test_an_attack_on_a_client_file_gets_the_clients_codes_and_writes_beside_the_runs(coded, store_run, tmp_path):
    from veil.attack.harness import attack
    from veil.attack.settings import AttackConfig
    from veil.client.attacked import ClientObfuscator
    from veil.errors import AttackError

    i8 = tmp_path / "int8.onnx"
    export(coded["run"], i8, precision="int8", calibration=64)
    run = load_run(coded["run"])
    wrapped = ClientObfuscator(read_client(i8), run.obfuscator)
    users = load_splits(coded["cfg"].data, 0).test.images
    x = users.float() / 255
    assert torch.equal(wrapped(x) * 3, read_client(i8).run(users).float())  # the client's codes, in f's scale
    x.requires_grad_(True)
    wrapped(x).sum().backward()  # the white-box attacker's gradient: the source obfuscator's
    x2 = (users.float() / 255).requires_grad_(True)
    run.obfuscator(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)

    s = AttackConfig(attackers="simrec", max_epochs=2, patience=1, batch_size=32, n_candidates=10, whitebox_images=8, whitebox_steps=5,
                     undefended=False, copies=False, device="cpu", progress=False, client=str(i8))
    result = attack(coded["run"], s, log=lambda *_: None)
    assert result["client"]["precision"] == "int8" and (coded["run"] / "attack-int8" / "attack.json").is_file()
    assert not (coded["run"] / "attack").exists()  # the run's own attack is not overwritten
    codes = read_client(i8).run(users).float() / 3
    with torch.no_grad():
        read = run.classifier(codes).argmax(1)
    assert result["accuracy"]["defended"] == pytest.approx(float((read == load_splits(coded["cfg"].data, 0).test.labels).float().mean()))
    other = tmp_path / "other.onnx"
    export(store_run["run"], other)
    with pytest.raises(AttackError, match="other.onnx: exported from obfuscator .* not from"):
        attack(coded["run"], AttackConfig(**{**s.__dict__, "client": str(other)}), log=lambda *_: None)
