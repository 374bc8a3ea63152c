"""Bad input gives one clear line naming the item and what was expected, and damages nothing.

Each CLI case runs `veil.cli.main` and checks the return code, that stderr is a single
`veil train: error: ...` line (never a traceback from inside torch), that no run directory was
left behind to block the next try, and that the input files are byte for byte unchanged.
Property-based tests (hypothesis) throw random and malformed configs and .npz files at the
loaders: the answer is a valid object or ConfigError/DataError, never another exception.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import tempfile
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from safetensors.torch import load, save
from tests.conftest import make_store

from veil import config as config_mod
from veil.cli import main
from veil.config import Config, ConfigError, DataConfig
from veil.data import DataError, Splits, load_splits, read_folder, read_npz
from veil.errors import StoreError
from veil.store.classify import accuracy_of, predict
from veil.store.dataset import open_store
from veil.store.format import MANIFEST, labels_digest

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def snapshot(*roots: Path) -> dict[str, bytes]:
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): p.read_bytes() for p in files}


def train_error(capsys, tmp_path: Path, raw: dict, overrides: list[str] = (), inputs: tuple[Path, ...] = ()) -> str:
    """`veil train` on `raw` must fail with code 2 and one line, leaving no run directory and the inputs intact."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = snapshot(config, *inputs)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("veil train: error: "), err
    assert not out.exists(), "a failed start must not leave a run directory that blocks the next try"
    assert snapshot(config, *inputs) == before
    return err


def tiny(path: Path, **data) -> dict:
    return {
        "data": {"dataset": "npz", "path": str(path), "test_fraction": 0.25, "attacker_fraction": 0.25, **data},
        "model": {"width": 0.0625},
        "train": {"pretrain_epochs": 1, "warmup_epochs": 0, "t_main": 0, "batch_size": 8},
        "device": "cpu",
        "progress": False,
    }


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- config


def test_mistyped_key_in_file_and_override(capsys, tmp_path, tiny_npz):
    raw = tiny(tiny_npz)
    raw["train"]["lamda_privacy"] = 0.5
    err = train_error(capsys, tmp_path, raw)
    assert "unknown config key 'train.lamda_privacy'. Did you mean 'train.lambda_privacy'? Valid keys: data.dataset, " in err
    err = train_error(capsys, tmp_path, tiny(tiny_npz), ["trian.t_main=3"])
    assert "override: unknown config key 'trian.t_main'. Did you mean 'train.t_main'?" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=16", "data.image_size must be >= 32 and a multiple of 4 (2**model.split), got 16"),
        ("data.image_size=34", "data.image_size must be >= 32 and a multiple of 4 (2**model.split), got 34"),
        ("train.lr_obfuscator=.inf", "train.lr_obfuscator must be a finite number, got inf"),
        ("seed=-1", "seed must be in 0..2**32-1, got -1"),
        ("device=cuda:x", "device must be auto, cpu or cuda[:N], got 'cuda:x'"),
        ("model.width=25", "model.width must be in (0, 8]"),
        ("data.on_bad_image=ignore", "data.on_bad_image must be one of error, skip, got 'ignore'"),
        ("train.t_main=[1", "'train.t_main' must be int, got '[1'"),
        ("train.t_main=400000", "the run would have 1200001 phase-epochs"),
    ],
)
def test_values_that_would_fail_deep_inside_torch_are_refused_up_front(capsys, tmp_path, tiny_npz, override, message):
    assert message in train_error(capsys, tmp_path, tiny(tiny_npz), [override])


def test_config_file_that_is_not_text(capsys, tmp_path):
    config = tmp_path / "weights.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "weights.yaml: not a text file" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert f"cannot resume: {tmp_path / 'nothing' / 'config.yaml'} not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data files


def test_missing_data_says_where_it_looked_and_how_to_get_it(capsys, tmp_path):
    raw = tiny(tmp_path)
    raw["data"] = {"dataset": "cifar10", "data_dir": str(tmp_path / "nowhere")}
    err = train_error(capsys, tmp_path, raw)
    assert f"no train split of 'cifar10' found under {tmp_path / 'nowhere'}" in err
    assert "Point data.data_dir (or $VEIL_DATA_DIR) at a copy, or set data.download=true" in err
    assert "data.path: .npz file not found" in train_error(capsys, tmp_path, tiny(tmp_path / "gone.npz"))
    raw["data"] = {"dataset": "folder", "path": str(tmp_path / "photos")}
    assert f"image folder not found: {tmp_path / 'photos'}" in train_error(capsys, tmp_path, raw)


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((20, 32, 32, 4), np.uint8), np.arange(20) % 2, "'images' must be N x H x W x C with C = 1 (grey) or 3 (RGB), got shape (20, 32, 32, 4)"),
        (np.zeros((20, 32, 32, 2), np.uint8), np.arange(20) % 2, "got shape (20, 32, 32, 2)"),
        (np.zeros((20, 3, 32, 32), np.uint8), np.arange(20) % 2, "(channels first? Veil expects channels last: N x H x W x C)"),
        (np.zeros((20, 64, 64, 3), np.uint8), np.arange(20) % 2, "images are 64x64, larger than data.image_size=32"),
        (np.zeros((20, 32, 32, 3), np.float32), np.arange(20) % 2, "'images' must be uint8 (0..255), got float32"),
        (np.zeros((20, 32, 32, 3), np.uint8), np.arange(19) % 2, "20 images but 19 labels"),
        (np.zeros((20, 32, 32, 3), np.uint8), np.eye(2)[np.arange(20) % 2], "'labels' must be a 1-D array of class indices, got shape (20, 2) (one-hot?"),
        (np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) / 3, "'labels' must be whole class indices 0..K-1, got dtype float64"),
        (np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) - 1, "labels must be in 0..18 for 19 classes, found -1..18"),
    ],
)
def test_npz_of_wrong_shape_type_or_labels(capsys, tmp_path, images, labels, message):
    npz = save_npz(tmp_path / "bad.npz", images=images, labels=labels)
    err = train_error(capsys, tmp_path, tiny(npz), inputs=(npz,))
    assert f"{npz}: " in err and message in err, err


def test_labels_beyond_the_named_classes(capsys, tmp_path):
    npz = save_npz(tmp_path / "bad.npz", images=np.zeros((20, 32, 32, 3), np.uint8), labels=np.arange(20) % 5, classes=np.array(["a", "b", "c"]))
    assert "labels must be in 0..2 for 3 classes, found 0..4" in train_error(capsys, tmp_path, tiny(npz), inputs=(npz,))


def test_npz_that_is_not_an_npz(capsys, tmp_path):
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros((4, 32, 32, 3), np.uint8))
    assert "holds a single array, not an .npz archive" in train_error(capsys, tmp_path, tiny(single), inputs=(single,))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert f"{empty}: not a readable .npz file" in train_error(capsys, tmp_path, tiny(empty), inputs=(empty,))


# ----------------------------------------------------------------------------- image folders


def make_folder(root: Path, sizes=((40, 30), (20, 50), (32, 32)), classes=("cats", "dogs"), grey_first=False) -> Path:
    from PIL import Image

    for c, colour in zip(classes, ((200, 10, 10), (10, 10, 200))):
        (root / c).mkdir(parents=True)
        for i, size in enumerate(sizes * 2):
            img = Image.new("RGB", size, colour)
            (img.convert("L") if grey_first and i == 0 else img).save(root / c / f"{i}.png")
    return root


def test_folder_of_mixed_sizes_and_modes_is_fine(tmp_path):
    folder = make_folder(tmp_path / "photos", grey_first=True)
    images, labels, classes = read_folder(folder, 32)
    assert images.shape == (12, 32, 32, 3) and classes == ["cats", "dogs"]  # RGB although the first file is grey
    assert (images[labels == 0][1:, ..., 0] > 150).all() and (images[labels == 1][1:, ..., 2] > 150).all()


def test_corrupt_images_are_fatal_or_skipped_with_a_count(capsys, tmp_path):
    folder = make_folder(tmp_path / "photos")
    (folder / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = (folder / "dogs" / "0.png").read_bytes()
    (folder / "dogs" / "cut.png").write_bytes(good[: len(good) // 2])
    raw = tiny(folder, dataset="folder")
    err = train_error(capsys, tmp_path, raw, inputs=(folder,))
    assert f"{folder / 'cats' / 'broken.png'}: not a readable image" in err and "set data.on_bad_image=skip" in err

    skipped: list[str] = []
    images, labels, _ = read_folder(folder, 32, "skip", skipped)
    assert len(images) == 12 and np.bincount(labels).tolist() == [6, 6]
    assert [s.split(":")[0] for s in skipped] == [str(folder / "cats" / "broken.png"), str(folder / "dogs" / "cut.png")]

    # Through the CLI: the run trains on the readable images and says how many it left out.
    before = snapshot(folder)
    config = tmp_path / "skip.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "data.on_bad_image=skip"]) == 0
    assert "skipped 2 unreadable image files (data.on_bad_image=skip), e.g. " in capsys.readouterr().out
    assert snapshot(folder) == before


def test_empty_class_folder(capsys, tmp_path):
    folder = make_folder(tmp_path / "photos")
    (folder / "birds").mkdir()
    (folder / "birds" / "notes.txt").write_text("no images here")
    err = train_error(capsys, tmp_path, tiny(folder, dataset="folder"), inputs=(folder,))
    assert f"{folder / 'birds'}: class folder holds no images (.png, .jpg" in err
    (folder / "birds" / "fake.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"birds: class folder holds no readable images \(1 files, all skipped as unreadable\)"):
        read_folder(folder, 32, "skip")


# ----------------------------------------------------------------------------- property-based: config


LEAVES = [k.split(".")[-1] for k in config_mod.valid_keys()]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["npz", "cifar10", "simrec", "adam", "cpu", "cuda:0", "skip", "1e-3", "true", "32"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(["data", "model", "train", *LEAVES]) | st.text(max_size=10)
sections = st.dictionaries(st.sampled_from(LEAVES) | st.text(max_size=10), values, max_size=5)
raw_configs = st.one_of(values, st.dictionaries(keys, values | sections, max_size=6))


@SETTINGS
@given(raw_configs)
def test_any_mapping_gives_a_config_or_config_error(raw):
    try:
        cfg = config_mod.from_dict(raw)
    except ConfigError as e:
        event("ConfigError")
        assert str(e).startswith("config: "), e  # says where
        return
    event("valid config")
    assert config_mod.from_dict(yaml.safe_load(config_mod.to_yaml(cfg))) == cfg  # what is valid survives a round trip


def _field_types() -> dict[str, str]:
    """Dotted key -> the name of its annotated type (int, float, bool, str)."""
    out = {}
    for key in config_mod.valid_keys():
        *section, leaf = key.split(".")
        cls = type(getattr(Config(), section[0])) if section else Config
        out[key] = typing.get_type_hints(cls)[leaf].__name__
    return out


FIELD_TYPES = _field_types()
# A bare leaf name is accepted where exactly one section has it (`lambda_privacy=0`).
ACCEPTED_KEYS = sorted(set(FIELD_TYPES) | {leaf for leaf, n in Counter(k.split(".")[-1] for k in FIELD_TYPES).items() if n == 1})
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
# What an error message calls a key, where it does not use the key's own name.
KEY_IN_MESSAGES: dict[str, str] = {}


def _dotted(key: str) -> str:
    return key if key in FIELD_TYPES else next(k for k in FIELD_TYPES if k.endswith("." + key))


def _put(cfg: Config, dotted: str, value: object) -> None:
    *section, leaf = dotted.split(".")
    setattr(getattr(cfg, section[0]) if section else cfg, leaf, value)


def _get(cfg: Config, dotted: str) -> object:
    *section, leaf = dotted.split(".")
    return getattr(getattr(cfg, section[0]) if section else cfg, leaf)


def _names_a_key(message: str, dotted_keys) -> bool:  # noqa: ANN001
    return any(leaf in message or KEY_IN_MESSAGES.get(leaf, leaf) in message for leaf in (k.split(".")[-1] for k in dotted_keys))


def _reads_back(text: str) -> bool:
    return yaml.safe_load(text) == text  # YAML reads the text as this very string (not a number, bool or null)


# A value of each field type with its text on the command line, read by YAML as that type.
TYPED_VALUES = {
    "int": st.integers(-(10**7), 10**7).map(lambda v: (v, str(v))),
    "float": st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: (v, repr(v))),
    "bool": st.sampled_from(sorted(BOOL_WORDS)).map(lambda w: (BOOL_WORDS[w], w)),
    "str": st.builds(str.__add__, st.sampled_from("abcdefghijklmnopqrstuvwxyz"), st.text("abcdefghijklmnopqrstuvwxyz0123456789_-./", max_size=11))
    .filter(_reads_back)
    .map(lambda s: (s, s)),
}
# Words that are no int, float or bool (float() takes nan and inf).
NOT_A_NUMBER = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
    lambda w: _reads_back(w) and w not in BOOL_WORDS and w not in ("nan", "inf", "infinity")
)


def _direct(settings_: dict[str, object], where: str) -> Config | str:
    """The expected outcome, without YAML or key lookup: the values set on a default Config, then
    validated; the Config, or the ConfigError's message."""
    cfg = Config()
    for dotted, value in settings_.items():
        _put(cfg, dotted, value)
    try:
        config_mod.validate(cfg, where)
    except ConfigError as e:
        return str(e)
    return cfg


@SETTINGS
@given(st.sampled_from(ACCEPTED_KEYS).flatmap(lambda k: st.tuples(st.just(k), TYPED_VALUES[FIELD_TYPES[_dotted(k)]])))
def test_an_override_sets_exactly_its_key_or_its_error_names_the_key(key_value):
    key, (value, text) = key_value
    dotted = _dotted(key)
    expected = _direct({dotted: value}, "override")
    if isinstance(expected, str):
        event("out of range")
        with pytest.raises(ConfigError) as e:
            config_mod.apply_overrides(Config(), [f"{key}={text}"])
        assert str(e.value) == expected
        assert _names_a_key(expected, [dotted]), expected
    else:
        event("set")
        cfg = config_mod.apply_overrides(Config(), [f"{key}={text}"])
        assert cfg == expected  # that key, and nothing else, changed
        assert _get(cfg, dotted) == value and type(_get(cfg, dotted)) is type(value)


@SETTINGS
@given(st.sampled_from([k for k in ACCEPTED_KEYS if FIELD_TYPES[_dotted(k)] != "str"]), NOT_A_NUMBER)
def test_an_override_of_the_wrong_type_names_key_type_and_value(key, word):
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(Config(), [f"{key}={word}"])
    assert str(e.value) == f"override: '{_dotted(key)}' must be {FIELD_TYPES[_dotted(key)]}, got {word!r}"


@SETTINGS
@given(st.text(max_size=12).filter(lambda k: "=" not in k and k.strip() not in ACCEPTED_KEYS), st.text(max_size=12))
def test_an_override_of_an_unknown_key_names_it(key, value):
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(Config(), [f"{key}={value}"])
    assert str(e.value).startswith(f"override: unknown config key '{key.strip()}'."), e.value


@SETTINGS
@given(st.text(max_size=30).filter(lambda s: "=" not in s))
def test_an_override_without_equals_sign_says_what_it_should_look_like(item):
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(Config(), [item])
    assert str(e.value) == f"override '{item}' must look like KEY=VALUE, e.g. train.lambda_privacy=0"


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(FIELD_TYPES)), st.just(None), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: TYPED_VALUES[FIELD_TYPES[k]] for k in keys})
))
def test_a_config_file_sets_exactly_its_keys_or_its_error_names_file_and_key(items):
    values = {k: v for k, (v, _) in items.items()}
    raw: dict = {}
    for dotted, value in values.items():
        *section, leaf = dotted.split(".")
        (raw.setdefault(section[0], {}) if section else raw)[leaf] = value
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        expected = _direct(values, str(path))
        if isinstance(expected, str):
            with pytest.raises(ConfigError) as e:
                config_mod.load(path)
            assert str(e.value) == expected
            assert expected.startswith(f"{path}: ") and _names_a_key(expected, values), expected
        else:
            assert config_mod.load(path) == expected


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_gives_its_config_or_an_error_naming_it(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_bytes(content)
        try:
            raw = yaml.safe_load(content.decode("utf-8"))
        except UnicodeDecodeError:
            event("not UTF-8")
            expected: Config | str = f"{path}: not a text file ("
        except yaml.YAMLError:
            event("not YAML")
            expected = f"{path}: not valid YAML: "
        else:
            try:
                expected = config_mod.from_dict(raw, str(path))
                event("a config")
            except ConfigError as e:
                event("not a config")
                expected = str(e)
        if isinstance(expected, Config):
            assert config_mod.load(path) == expected
        else:
            with pytest.raises(ConfigError) as e:
                config_mod.load(path)
            assert str(e.value).startswith(expected) and expected.startswith(f"{path}: "), e.value


# ----------------------------------------------------------------------------- property-based: data loaders


dtypes = st.sampled_from([np.uint8, np.int8, np.int64, np.uint16, np.float32, np.float64, np.bool_, np.complex64]) | hnp.unicode_string_dtypes(max_len=3)
any_array = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5))
image_shapes = st.tuples(st.integers(0, 12), st.integers(1, 40), st.integers(1, 40), st.integers(0, 5)).map(
    lambda s: s[:3] if s[3] == 0 else s  # channel 0 stands for "no channel axis" (greyscale N x H x W)
)
plausible_images = image_shapes.flatmap(lambda s: hnp.arrays(np.uint8, s) | hnp.arrays(dtypes, s))
plausible_labels = st.tuples(
    st.integers(0, 12).flatmap(lambda n: hnp.arrays(np.int64, n, elements=st.integers(-2, 12))),
    st.sampled_from([np.int64, np.int32, np.float64, np.uint8]),
).map(lambda t: t[0].astype(t[1]))
npz_contents = st.fixed_dictionaries(
    {},
    optional={
        "images": plausible_images | any_array,
        "labels": plausible_labels | any_array,
        "classes": any_array | st.lists(st.text(max_size=4), max_size=12).map(np.array),
        "jpeg_bytes": any_array,
        "offsets": any_array,
        "extra": any_array,
    },
)


def _load_npz_bytes(data: bytes) -> Splits | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.npz"
        path.write_bytes(data)
        try:
            s = load_splits(DataConfig(dataset="npz", path=str(path), cache_dir=d, test_fraction=0.3, attacker_fraction=0.3), 0)
        except DataError:
            event("DataError")
            return None
    event("image sets")
    for part in (s.defender, s.attacker, s.test):
        assert part.images.dtype.is_floating_point is False and part.images.shape[1:] == (s.channels, 32, 32)
        assert len(part) > 0 and 0 <= int(part.labels.min()) and int(part.labels.max()) < s.num_classes
    return s


@SETTINGS
@given(npz_contents)
def test_any_npz_contents_give_image_sets_or_data_error(contents):
    buf = io.BytesIO()
    np.savez(buf, **contents)
    _load_npz_bytes(buf.getvalue())


@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 10_000))
def test_random_or_truncated_npz_files_give_data_error(noise, cut):
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((12, 8, 8, 3), np.uint8), labels=np.arange(12) % 3)
    whole = buf.getvalue()
    assert _load_npz_bytes(whole) is not None
    assert _load_npz_bytes(noise) is None
    assert _load_npz_bytes(whole[: cut % len(whole)]) is None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4), st.sampled_from(["error", "skip"]))
def test_folders_of_random_files_give_images_or_data_error(blobs, on_bad_image):
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "a").mkdir()
        (root / "b").mkdir()
        Image.new("RGB", (9, 7), (1, 2, 3)).save(root / "a" / "ok.png")
        for i, blob in enumerate(blobs):
            (root / "b" / f"{i}.png").write_bytes(blob)
        try:
            images, labels, classes = read_folder(root, 32, on_bad_image)
        except DataError:
            return
        assert images.shape[1:] == (32, 32, 3) and classes == ["a", "b"] and set(labels.tolist()) == {0, 1}


# ----------------------------------------------------------------------------- the feature store


def store_cli_error(capsys, argv: list[str], *watched: Path) -> str:
    """A store command that must fail with code 2 and one line, every watched file byte for byte unchanged."""
    before = snapshot(*watched)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"veil {argv[0]}: error: "), err
    assert snapshot(*watched) == before
    return err


def test_store_commands_refuse_bad_input_in_one_line_and_change_nothing(capsys, tmp_path, store_run):
    from tests.conftest import make_store, read_all

    from veil.store.format import id_hex

    private = tmp_path / "private"
    private.mkdir()
    store = make_store(store_run, tmp_path, shard_size=16, id_map=private / "ids.jsonl")
    other = make_store(store_run, tmp_path, name="other", id_map=private / "other.jsonl")
    ids = id_hex(read_all(store)["ids"])
    watched = (store, private)

    # An id the store never held.
    err = store_cli_error(capsys, ["erase", str(store), "--ids", ids[0], "0" * 32, "--no-progress"], *watched)
    assert f"{store}: 1 id(s) not in the store and never erased from it: {'0' * 32}; nothing was erased" in err
    err = store_cli_error(capsys, ["erase", str(store), "--ids", "12ab", "--no-progress"], *watched)
    assert "--ids '12ab': neither an id (32 hex digits) nor a file of ids" in err
    # An id map of another store, a file that is no id map, an item the map does not hold, --items without a map.
    err = store_cli_error(capsys, ["erase", str(store), "--id-map", str(private / "other.jsonl"), "--items", "run:test#0"], *watched)
    assert "other.jsonl: id map of store" in err and f"but {store} is store" in err
    (private / "notes.txt").write_text("hello\n")
    err = store_cli_error(capsys, ["erase", str(store), "--id-map", str(private / "notes.txt"), "--items", "run:test#0"], *watched)
    assert "notes.txt: not a Veil id map" in err
    err = store_cli_error(capsys, ["erase", str(store), "--id-map", str(private / "ids.jsonl"), "--items", "run:test#600"], *watched)
    assert "ids.jsonl: no item 'run:test#600'" in err
    err = store_cli_error(capsys, ["erase", str(store), "--items", "run:test#0"], *watched)
    assert "--items needs --id-map FILE" in err
    err = store_cli_error(capsys, ["erase", str(store)], *watched)
    assert "nothing to erase" in err
    # An id map inside the store; appending under another --id-map of another store.
    run = ["obfuscate", "--run", str(store_run["run"]), "--data", "run:test", "--device", "cpu", "--no-progress"]
    err = store_cli_error(capsys, [*run, "--append", str(store), "--id-map", str(store / "ids.jsonl")], *watched)
    assert "inside the store" in err
    err = store_cli_error(capsys, [*run, "--append", str(store), "--id-map", str(private / "other.jsonl")], *watched)
    assert "id map of store" in err
    # A damaged store: erase and append name the shard; nothing is written.
    shard = store / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    err = store_cli_error(capsys, ["erase", str(store), "--ids", ids[0], "--no-progress"], *watched)
    assert "shard-00002.safetensors: shard truncated" in err
    err = store_cli_error(capsys, [*run, "--append", str(store)], *watched)
    assert "shard-00002.safetensors: shard truncated" in err
    (store / "manifest.json").write_text("{")
    err = store_cli_error(capsys, ["erase", str(store), "--ids", ids[0]], *watched)
    assert "manifest.json: damaged" in err
    # A URL whose filesystem package is not installed; a scheme fsspec does not know.
    if importlib.util.find_spec("s3fs") is None:
        err = store_cli_error(capsys, ["erase", "s3://bucket/store", "--ids", ids[0]], *watched)
        assert err.endswith("s3://bucket/store: 's3://' needs the s3fs package, which is not installed (pip install s3fs)")
        err = store_cli_error(capsys, [*run, "--out", "s3://bucket/store"], *watched)
        assert "needs the s3fs package" in err
    err = store_cli_error(capsys, ["verify", "nosuch://bucket/store"], *watched)
    assert "no filesystem for 'nosuch://'" in err
    assert snapshot(other)  # the other store was never touched either


# ----------------------------------------------------------------------------- every bad input one clear line (issue 28)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, store_run) -> dict:
    """A store (with its id map), a run with a damaged summary.json, a store of classes the run lacks, an npz with a label -1."""
    root = tmp_path_factory.mktemp("bad-input")
    private = root / "private"
    private.mkdir()
    images, labels, classes = read_npz(store_run["npz"])
    fruit = root / "fruit"  # classes 'apple' (not one of CIFAR-10's) and 'cat'
    for name, label in (("apple", 0), ("cat", 3)):
        (fruit / name).mkdir(parents=True)
        for i in (labels == label).nonzero()[0][:3]:
            Image.fromarray(images[i]).save(fruit / name / f"{i}.png")
    damaged = root / "damaged-run"
    shutil.copytree(store_run["run"], damaged)
    (damaged / "summary.json").write_text('{"pretrain_test_accuracy": 0.5, "final_')
    minus_one = save_npz(root / "minus-one.npz", images=images[:20], labels=np.r_[-1, labels[1:20]], classes=np.array(classes))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny(store_run["npz"])))
    return {
        "root": root, "run": store_run["run"], "private": private, "damaged": damaged, "minus_one": minus_one, "config": config,
        "store": make_store(store_run, root, shard_size=16, id_map=private / "ids.jsonl"),
        "fruit": make_store(store_run, root, data=f"folder:{fruit}", name="fruit-store"),
        "image": fruit / "cat" / sorted(p.name for p in (fruit / "cat").iterdir())[0],
    }


def _obfuscate(c: dict, *more: str) -> list[str]:
    return ["obfuscate", "--run", str(c["run"]), "--device", "cpu", "--no-progress", *more]


# (argv from the fixture, what the one line must say); every case exits 2 and changes nothing of the run, store or id map.
BAD_COMMANDS = {
    # 3. predict --store compares the store's classes with the classifier's by name, and refuses one it lacks
    "predict --store with a class the run lacks": (lambda c: ["predict", "--run", str(c["run"]), "--store", str(c["fruit"]), "--device", "cpu"],
                                                   "class 'apple' of the store is not among the classifier's 10 classes (airplane, automobile"),
    # 4. labels out of range never reach a store
    "obfuscate of a label -1": (lambda c: _obfuscate(c, "--data", f"npz:{c['minus_one']}", "--out", str(c["root"] / "minus-one-store")),
                                "minus-one.npz: labels must be in 0..9 for 10 classes, found -1.."),
    # 5. report --images bounds: refused, not clamped (a typo should not silently draw 32 images)
    "report --images 0": (lambda c: ["report", str(c["run"]), "--images", "0"], "--images must be in 1..32 (users' images per row of Figures 4 and 5), got 0"),
    "report --images -3": (lambda c: ["report", str(c["run"]), "--images", "-3"], "--images must be in 1..32 (users' images per row of Figures 4 and 5), got -3"),
    "report --images 100000": (lambda c: ["report", str(c["run"]), "--images", "100000"], "got 100000"),
    # 7. a damaged summary.json, named
    "attack, summary.json damaged": (lambda c: ["attack", str(c["damaged"])], "damaged-run/summary.json: damaged, not valid JSON (Unterminated string"),
    "obfuscate --run, summary.json damaged": (lambda c: ["obfuscate", "--run", str(c["damaged"]), "--data", "run:test", "--out", str(c["root"] / "s"),
                                                         "--device", "cpu"], "damaged-run/summary.json: damaged, not valid JSON"),
    "predict --run, summary.json damaged": (lambda c: ["predict", "--run", str(c["damaged"]), str(c["image"]), "--device", "cpu"],
                                            "damaged-run/summary.json: damaged, not valid JSON (Unterminated string starting at: line 1 column 33 "
                                            "(char 32)); `veil train --resume"),
    # 8. the smaller ones
    "attack --seed 99999999999999999999": (lambda c: ["attack", str(c["run"]), "--seed", "99999999999999999999"],
                                           "--seed must be in 0..2**32-1, got 99999999999999999999"),
    "attack --seed -1": (lambda c: ["attack", str(c["run"]), "--seed", "-1"], "--seed must be in 0..2**32-1, got -1"),
    "train-classifier --lr nan": (lambda c: ["train-classifier", str(c["store"]), "--out", str(c["root"] / "clf"), "--lr", "nan", "--no-progress"],
                                  "--lr must be a finite number > 0, got nan"),
    "train-classifier --dropout 1.5": (lambda c: ["train-classifier", str(c["store"]), "--out", str(c["root"] / "clf"), "--dropout", "1.5"],
                                       "error: --dropout must be a finite number in [0, 1), got 1.5"),
    "train-classifier --weight-decay -1": (lambda c: ["train-classifier", str(c["store"]), "--out", str(c["root"] / "clf"), "--weight-decay", "-1"],
                                           "error: --weight-decay must be a finite number >= 0, got -1.0"),
    "train --nproc 0": (lambda c: ["train", "--config", str(c["config"]), "--out", str(c["root"] / "r"), "--nproc", "0"],
                        "--nproc must be >= 1 (processes to train with), got 0"),
    "train --resume RUN --config X": (lambda c: ["train", "--resume", str(c["run"]), "--config", str(c["config"])],
                                      "continues that run with its own config.yaml, in its own folder; it takes no --config "),
    "train --resume RUN --out Y": (lambda c: ["train", "--resume", str(c["run"]), "--out", str(c["root"] / "elsewhere")], "it takes no --out "),
    "train t_sub=0": (lambda c: ["train", "--config", str(c["config"]), "--out", str(c["root"] / "r"), "train.t_main=1", "train.t_sub=0"],
                      "train.t_sub=0 gives the 1 round(s) of defence adversarial no epoch that trains the obfuscator, so 'after adversarial' would be "
                      "the pretrained one; set train.t_sub >= 1, or train.t_main=0 for no rounds"),
    "train, overrides after --out": (lambda c: ["train", "--config", str(c["config"]), "seed=1", "--out", str(c["root"] / "r"), "trian.t_sub=1"],
                                     "override: unknown config key 'trian.t_sub'. Did you mean 'train.t_sub'?"),  # read as an override
    "predict --show -5": (lambda c: ["predict", "--run", str(c["run"]), "--store", str(c["store"]), "--show", "-5"],
                          "--show must be -1 (all) or a count >= 0, got -5"),
    "obfuscate --out memory://": (lambda c: _obfuscate(c, "--data", "run:test", "--out", "memory://x"),
                                  "memory://x: a memory:// store lives inside one process and would vanish when veil exits"),
    "append the same images twice": (lambda c: _obfuscate(c, "--data", "run:test", "--append", str(c["store"]), "--id-map", str(c["private"] / "ids.jsonl")),
                                     "--data run:test: these 60 items are exactly the store's first items of "),
    "sweep --out onto a run": (lambda c: ["sweep", "--config", str(c["config"]), "--lambdas", "0", "--out", str(c["run"])],
                               "holds a run (config.yaml), not a sweep; give the sweep a folder of its own"),
    "obfuscate, relative path not found": (lambda c: _obfuscate(c, "--data", "npz:no/such.npz", "--out", str(c["root"] / "s")),
                                           f"--data: .npz file not found: no/such.npz (relative to the working directory, {Path.cwd()})"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_each_bad_command_is_one_line_and_changes_nothing(capsys, bad, case):
    argv, message = BAD_COMMANDS[case]
    argv = argv(bad)
    err = store_cli_error(capsys, argv, bad["run"], bad["store"], bad["private"], bad["damaged"])
    assert message in err, err
    for made in ("minus-one-store", "s", "clf", "r", "elsewhere"):
        assert not (bad["root"] / made).exists(), made  # nothing left to block the next try


def test_predict_scores_a_store_against_the_classifiers_classes_by_name(tmp_path, store_run, capsys):
    """A store of two class folders through a CIFAR-10 run: its labels 0 and 1 index its own two classes, which are
    two of the run's ten; predictions are scored against the class of the same name."""
    from veil.rundir import load_run

    images, labels, classes = read_npz(store_run["npz"])
    run = load_run(store_run["run"])
    with torch.no_grad():
        named = [classes[k] for k in run.classifier(run.obfuscator(torch.from_numpy(images[:60]).permute(0, 3, 1, 2).float() / 255)).argmax(1)]
    common = Counter(named).most_common(1)[0][0]  # a class the tiny run does predict
    other = "cat" if common != "cat" else "dog"
    folder, picks = tmp_path / "pets", {common: [i for i, n in enumerate(named) if n == common][:5], other: [i for i, n in enumerate(named) if n != common][:5]}
    for name, chosen in picks.items():
        (folder / name).mkdir(parents=True)
        for i in chosen:
            Image.fromarray(images[i]).save(folder / name / f"{i:03d}.png")
    store = make_store(store_run, tmp_path, data=f"folder:{folder}")
    preds = predict(store_run["run"], store=store, device="cpu")
    expected = [name for name in sorted(picks) for _ in picks[name]]  # the store's classes: its folders by name
    assert [p.true_label for p in preds] == [classes.index(name) for name in expected]
    right = sum(p.name == name for p, name in zip(preds, expected))
    assert accuracy_of(preds) == right / len(preds) and right >= len(picks[common]) - 1  # by name, not by comparing indices of two class lists
    assert main(["predict", "--run", str(store_run["run"]), "--store", str(store)]) == 0
    assert f"accuracy against the store's labels: {right / len(preds):.2%} ({len(preds)} items)" in capsys.readouterr().out


def test_open_store_checks_counts_and_label_range_cheaply(tmp_path, store_run):
    store = make_store(store_run, tmp_path, shard_size=16)
    manifest = json.loads((store / MANIFEST).read_text())
    (store / MANIFEST).write_text(json.dumps({**manifest, "count": 61}))
    with pytest.raises(StoreError, match=r"manifest\.json: count is 61 but its shards list 60 items$"):
        open_store(store)
    # A shard holding a label beyond the classes, its checksums made to agree (what the old obfuscate could write).
    first = manifest["shards"][1]
    tensors = load((store / first["file"]).read_bytes())
    tensors["labels"][0] = 10
    data = save(tensors)
    (store / first["file"]).write_bytes(data)
    first.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    all_labels = torch.cat([load((store / s["file"]).read_bytes())["labels"] for s in manifest["shards"]])
    (store / MANIFEST).write_text(json.dumps({**manifest, "labels_sha256": labels_digest(all_labels)}))
    ds = open_store(store)
    assert ds[0][1] == int(all_labels[0])  # shard 0 is fine
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: labels must be in 0\.\.9, found \d\.\.10$"):
        ds[16]


def test_every_command_prints_its_help(capsys):
    """--help of every command formats (argparse %-formats help texts: a '%' in a docstring once broke `veil attack --help`)."""
    import argparse

    from veil.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "attack", "sweep", "growth"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert f"usage: veil {name}" in capsys.readouterr().out
