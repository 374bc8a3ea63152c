import pytest

from veil import config as config_mod
from veil.config import ConfigError


def test_round_trip_yaml(tmp_path):
    cfg = config_mod.from_dict({"model": {"width": 0.5}, "train": {"lambda_privacy": 0.3}, "seed": 7})
    path = tmp_path / "c.yaml"
    path.write_text(config_mod.to_yaml(cfg))
    again = config_mod.load(path)
    assert again == cfg and again.model.width == 0.5 and again.seed == 7


def test_overrides_dotted_and_bare(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  t_main: 3\n")
    cfg = config_mod.load(path, ["train.lambda_privacy=0", "width=0.25", "device=cpu", "augment=false"])
    assert cfg.train.lambda_privacy == 0 and cfg.model.width == 0.25 and cfg.device == "cpu" and cfg.data.augment is False
    assert cfg.train.t_main == 3


def test_unknown_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lamda_privacy: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lamda_privacy'. Did you mean 'train.lambda_privacy'"):
        config_mod.load(path)


def test_wrong_type_and_range_named():
    with pytest.raises(ConfigError, match=r"'train.t_main' must be int, got 'ten'"):
        config_mod.from_dict({"train": {"t_main": "ten"}})
    with pytest.raises(ConfigError, match=r"model.reconstructor must be one of simrec, urec1, urec2, resrec, got 'unet'"):
        config_mod.from_dict({"model": {"reconstructor": "unet"}})
    with pytest.raises(ConfigError, match=r"model.input_norm must be one of none, image, channel, got 'pixel'"):
        config_mod.from_dict({"model": {"input_norm": "pixel"}})
    with pytest.raises(ConfigError, match="data.path is required"):
        config_mod.from_dict({"data": {"dataset": "npz"}})
    with pytest.raises(ConfigError, match=r"train.defence=vib needs float codes \(model.feature_bits=0, got 2\)"):
        config_mod.from_dict({"train": {"defence": "vib"}, "model": {"split": 5, "bottleneck": "learned", "bottleneck_channels": 16, "feature_bits": 2}})


def test_every_config_in_repo_loads():
    from tests.conftest import ROOT

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        config_mod.load(f)


def test_readme_names_every_key_that_may_change_on_resume():
    from tests.conftest import ROOT

    readme = ROOT.joinpath("README.md").read_text()
    sentence = readme[readme.index("may be overridden on `--resume`") - 400 : readme.index("may be overridden on `--resume`")]
    missing = [k for k in config_mod.RESUME_MAY_CHANGE if f"`{k}`" not in sentence]
    assert not missing, f"README's --resume sentence does not name {missing}"


def test_a_reconstructor_pool_names_known_members_once():
    cfg = config_mod.from_dict({"model": {"reconstructor": "simrec, unet,resrec"}, "train": {"defence": "pool", "t_reconstructor": 3}})
    assert cfg.model.reconstructor == "simrec, unet,resrec"
    for bad, msg in (("simrec,vae", "a pool's members must be among .* got vae"), ("simrec,simrec", "names each member once"),
                     ("unet", "must be one of simrec, urec1, urec2, resrec"), ):
        with pytest.raises(ConfigError, match=f"model.reconstructor.*{msg}|{msg}"):
            config_mod.from_dict({"model": {"reconstructor": bad}})
    with pytest.raises(ConfigError, match="train.reinit_every must be >= 0, got -1"):
        config_mod.from_dict({"train": {"reinit_every": -1}})


def test_data_task_is_checked_when_read():
    for task in ("none", "cifar10-superclass", "0,1,8,9;2,3,4,5,6,7", " 0, 1 ; 2,3,4,5,6,7,8,9 "):
        config_mod.from_dict({"data": {"task": task}})
    config_mod.from_dict({"data": {"dataset": "mnist", "task": "mnist-parity"}})
    config_mod.from_dict({"data": {"dataset": "npz", "path": "x.npz", "task": "0;1;2"}})  # the class count is checked on loading
    for task, message in (
        ("0,1,8;2,3,4,5,6,7", "class 9 in no group of '0,1,8;2,3,4,5,6,7'"),
        ("0,1,8,9;1,2,3,4,5,6,7", "class 1 in more than one place"),
        ("0,1,8,9;2,3,4,5,6,7,10", "class 10 out of range: the data has classes 0..9"),
        ("vehicles", "must be none, cifar10-superclass, mnist-parity or groups of class indices"),
        ("0,1;a,b", "group 'a,b' of '0,1;a,b' is not a comma-separated list of class indices"),
        ("0,1;;2", "group '' of"),
    ):
        with pytest.raises(ConfigError, match=rf"data\.task: {message}"):
            config_mod.from_dict({"data": {"task": task}})
    with pytest.raises(ConfigError, match=r"data.task: 'mnist-parity' is a labelling of mnist, not of data.dataset cifar10"):
        config_mod.from_dict({"data": {"task": "mnist-parity"}})
    with pytest.raises(ConfigError, match=r"data.task: 'cifar10-superclass' groups 10 classes, the data has 100"):
        config_mod.from_dict({"data": {"dataset": "cifar100", "task": "cifar10-superclass"}})
    with pytest.raises(ConfigError, match=r"data.n_later must be >= 0, got -1"):
        config_mod.from_dict({"data": {"n_later": -1}})
