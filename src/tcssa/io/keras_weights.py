"""Keras 3 ``.keras`` model files, read without Keras: the architecture and every weight array.

A ``.keras`` file is a zip holding ``config.json`` (the architecture, layer by layer),
``metadata.json`` (the Keras version) and ``model.weights.h5``. The h5 file does not use the layer
names of the config: Keras stores each layer under a generic name made from its class (``Conv2D``
-> ``conv2d``, ``conv2d_1``, ... counted per class in the order of the model's layers), with its
variables as ``vars/0``, ``vars/1``, ... in the order the layer created them (Conv2D and Dense:
kernel, bias; BatchNormalization: gamma, beta, moving mean, moving variance). A nested model (a
``Functional`` inside a ``Sequential``) keeps its own layers under ``<its path>/layers/``.
``KerasArchive.layer_weights`` undoes this, so a converter can address weights by the config's
layer names (``densenet121/conv1_conv``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

CONFIG_MEMBER = "config.json"
WEIGHTS_MEMBER = "model.weights.h5"
METADATA_MEMBER = "metadata.json"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the key of converted-weight caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keras_snake_case(class_name: str) -> str:
    """The generic name Keras gives a ``class_name`` layer in the weights file (``Conv2D``: ``conv2d``)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the config: its qualified name (``densenet121/conv1_conv``), class and settings."""

    name: str
    class_name: str
    config: dict[str, Any]
    weights_path: str  # where its variables sit in model.weights.h5 ("layers/functional/layers/conv2d")


@dataclass(frozen=True)
class KerasArchive:
    path: Path
    config: dict[str, Any]
    metadata: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(repr=False)  # h5 dataset path -> array
    layers: tuple[KerasLayer, ...] = field(repr=False)  # every layer, nested models' layers included

    def layer(self, name: str) -> KerasLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{self.path}: no layer {name!r} in the model config")

    def variables(self, name: str) -> list[np.ndarray]:
        """The variables of the layer ``name`` (qualified), in the order Keras created them."""
        prefix = self.layer(name).weights_path + "/vars/"
        found = {
            int(key[len(prefix) :]): value for key, value in self.arrays.items() if key.startswith(prefix)
        }
        return [found[i] for i in range(len(found))]

    def layer_weights(self) -> dict[str, list[np.ndarray]]:
        """Qualified layer name -> its variables, for every layer that has any."""
        result = {}
        for layer in self.layers:
            values = self.variables(layer.name)
            if values:
                result[layer.name] = values
        return result


def _walk_layers(layer_configs: list[dict[str, Any]], name_prefix: str, path_prefix: str) -> list[KerasLayer]:
    used: dict[str, int] = {}
    found: list[KerasLayer] = []
    for entry in layer_configs:
        class_name = entry["class_name"]
        config = entry.get("config", {})
        generic = keras_snake_case(class_name)
        if generic in used:
            used[generic] += 1
            generic = f"{generic}_{used[generic]}"
        else:
            used[generic] = 0
        name = name_prefix + config.get("name", generic)
        weights_path = f"{path_prefix}layers/{generic}"
        found.append(KerasLayer(name, class_name, config, weights_path))
        if isinstance(config.get("layers"), list):  # a nested model: its layers live under its own path
            found.extend(_walk_layers(config["layers"], name + "/", weights_path + "/"))
    return found


def read_keras_archive(path: str | Path) -> KerasArchive:
    """The config, metadata and weight arrays of a Keras 3 ``.keras`` file; a file that is not one is
    a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            missing = [m for m in (CONFIG_MEMBER, WEIGHTS_MEMBER) if m not in members]
            if missing:
                raise ValueError(
                    f"{path}: not a Keras 3 .keras file (the zip lacks {', '.join(missing)}; it holds "
                    f"{sorted(members)[:5]})"
                )
            config = json.loads(archive.read(CONFIG_MEMBER).decode("utf-8"))
            metadata = json.loads(archive.read(METADATA_MEMBER)) if METADATA_MEMBER in members else {}
            weights_bytes = archive.read(WEIGHTS_MEMBER)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a Keras 3 .keras file (not a zip: {err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the Keras config inside is not valid JSON ({err})") from err
    arrays: dict[str, np.ndarray] = {}
    try:
        with h5py.File(io.BytesIO(weights_bytes), "r") as weights:
            weights.visititems(
                lambda key, item: (
                    arrays.__setitem__(key, item[()]) if isinstance(item, h5py.Dataset) else None
                )
            )
    except OSError as err:
        raise ValueError(f"{path}: {WEIGHTS_MEMBER} inside is not a readable h5 file ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("config", {}).get("layers"), list):
        raise ValueError(f"{path}: the Keras config has no layer list (config.layers); is it a model file?")
    layers = _walk_layers(config["config"]["layers"], "", "")
    return KerasArchive(path, config, metadata, arrays, tuple(layers))
