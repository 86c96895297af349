"""``TrainConfig``: every hyperparameter of a training run, with docs/METHOD.md's defaults.

Loadable from YAML (``TrainConfig.from_yaml``), overridable by command-line
flags (``config.override(**flags)``, where a flag left at None keeps the
value), and written beside the run as JSON (``to_dict``).
"""

from __future__ import annotations

import json
import math
import numbers
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from tcssa.io.files import read_text


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained and evaluated on each fold.

    Batches: ``batch_size`` slides go through one forward pass (padded to the
    longest slide, with a mask), ``grad_accum_steps`` such passes make one
    optimizer update, so an update averages the gradient over
    ``batch_size * grad_accum_steps`` slides. That number is global: under
    ``torchrun`` the slides of each update are dealt to the processes, so the
    optimizer sees the same updates whatever the number of processes.
    """

    # Each field's metadata["help"] is its `tcssa train` / `tcssa compare` flag's help (tcssa.cli.flags
    # builds the flags from the fields, with the default appended).
    model: str = field(
        default="tcssa",
        metadata={"help": "slide classifier: tcssa, abmil, abmil-gated, transmil, mean, max, random-k, ..."},
    )
    num_slots: int = field(default=32, metadata={"help": "tokens per slide K for tcssa and the *-k models"})
    model_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"cli": False, "help": "a mapping passed to tcssa.mil.build_model (--config file only)"},
    )

    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=20, metadata={"help": "maximum epochs per fold"})
    # ReduceLROnPlateau on the validation loss. METHOD.md names the scheduler but not its
    # settings; halving after 2 flat epochs lets it act before early stopping (patience 5) ends a run.
    lr_factor: float = field(
        default=0.5, metadata={"help": "factor the lr is multiplied by when the validation loss stalls"}
    )
    lr_patience: int = field(
        default=2, metadata={"help": "epochs without a lower validation loss before the lr is reduced"}
    )
    early_stopping_patience: int = field(
        default=5, metadata={"help": "epochs without a lower validation loss before stopping"}
    )
    # Worth it with several slides per update and the lr scaled up to match (`tcssa bench`'s
    # batched loop, docs/RESULTS.md).
    warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "linear lr warm-up over this many epochs; helps with several slides per update"},
    )

    batch_size: int = field(default=1, metadata={"help": "slides per forward pass, padded with a mask"})
    grad_accum_steps: int = field(
        default=1,
        metadata={
            "help": "forward passes per optimizer update; an update averages over "
            "batch-size x grad-accum-steps slides, however many processes run"
        },
    )
    eval_batch_size: int = field(
        default=1, metadata={"help": "slides per forward pass when evaluating: validation, test, tcssa eval"}
    )
    max_patches: int | None = field(
        default=None,
        metadata={"help": "cap on patches per training slide, a random subset (default: all; eval uses all)"},
    )

    folds: int = field(default=5, metadata={"help": "stratified, patient-grouped folds"})
    val_fraction: float = field(
        default=0.15, metadata={"help": "share of each fold's training slides held out for validation"}
    )
    seed: int = field(default=0, metadata={"help": "seed for splits, initialisation and sampling"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda or cuda:N"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader processes reading feature files"})
    cache_gb: float = field(
        default=0.0,
        metadata={"help": "keep up to this many GB of training features in memory (float16) across epochs"},
    )

    def __post_init__(self) -> None:
        for name, kind in _field_kinds().items():
            problem = _type_problem(getattr(self, name), kind)
            if problem:
                raise ValueError(f"{name} must be {problem}, got {getattr(self, name)!r}")
        positive = ("num_slots", "epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "folds")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.lr_patience < 0 or self.early_stopping_patience < 1:
            raise ValueError("lr_patience must be >= 0 and early_stopping_patience >= 1")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"max_patches must be >= 1 (or unset), got {self.max_patches}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0 or self.cache_gb < 0:
            raise ValueError("num_workers and cache_gb must be >= 0")
        if not isinstance(self.model_options, dict):
            raise ValueError(f"model_options must be a mapping, got {type(self.model_options).__name__}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from ``{option: value}`` read from ``source`` (a file name, for the messages).

        Every value is checked against the field's type: a number written as a string (PyYAML reads
        ``1e-3``, without a dot, as one) becomes a number for a float field; a value that is not of
        the field's type (``epochs: 1.5``, ``lr: fast``) is an error naming the option, the value
        and ``source``.
        """
        if not isinstance(values, dict):
            raise ValueError(
                f"{source}: expected a mapping of option: value, got {type(values).__name__} {values!r}"
            )
        odd_keys = [k for k in values if not isinstance(k, str)]
        if odd_keys:
            raise ValueError(f"{source}: option names must be text, got {odd_keys!r}")
        kinds = _field_kinds()
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ValueError(f"{source}: unknown training option(s) {unknown}; known: {sorted(kinds)}")
        coerced = {}
        for key, value in values.items():
            converted, problem = _coerce(value, kinds[key])
            if problem:
                raise ValueError(f"{source}: option {key!r} must be {problem}, got {value!r}")
            coerced[key] = converted
        try:
            return cls(**coerced)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(read_text(path))
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from err
        except (UnicodeDecodeError, OSError) as err:
            raise ValueError(f"{path}: cannot read the config file ({err})") from err
        if values is None:
            raise ValueError(
                f"{path}: the config file holds no options (it is empty or null); write option: value "
                "lines (TrainConfig fields), or leave out --config"
            )
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}: expected a mapping of option: value, got {type(values).__name__} {values!r}"
            )
        keys = {k: k.replace("-", "_") if isinstance(k, str) else k for k in values}
        return cls.from_dict({keys[k]: v for k, v in values.items()}, source=str(path))

    def override(self, **values: Any) -> TrainConfig:
        """A copy with the given options replaced; None means "not given" and keeps the current value."""
        given = {k: v for k, v in values.items() if v is not None}
        known = {f.name for f in fields(self)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        return replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def slides_per_update(self) -> int:
        return self.batch_size * self.grad_accum_steps


# ------------------------------------------------------------------ field types
# Each field's kind, read from the dataclass annotations: "int", "float", "str", "dict", with
# "|None" when None is allowed too.


def _field_kinds() -> dict[str, str]:
    global _KINDS
    if _KINDS is None:
        hints = typing.get_type_hints(TrainConfig)
        _KINDS = {f.name: _kind(hints[f.name], f.name) for f in fields(TrainConfig)}
    return _KINDS


_KINDS: dict[str, str] | None = None


def _kind(annotation: Any, name: str) -> str:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return _kind(inner[0], name) + "|None"
    base = origin or annotation
    for kind, python_type in (("int", int), ("float", float), ("str", str), ("dict", dict), ("bool", bool)):
        if base is python_type:
            return kind
    raise TypeError(f"TrainConfig.{name}: no type check for the annotation {annotation!r}")


_DESCRIPTIONS = {
    "int": "a whole number",
    "float": "a finite number",
    "str": "text",
    "dict": "a mapping (option: value)",
    "bool": "true or false",
}


def _describe(kind: str) -> str:
    base, _, optional = kind.partition("|")
    return _DESCRIPTIONS[base] + (" or null" if optional else "")


def _type_problem(value: Any, kind: str) -> str | None:
    """What ``value`` should be when it is not of ``kind`` (no conversion), else None."""
    base, _, optional = kind.partition("|")
    if value is None:
        return None if optional else _describe(kind)
    if base == "bool":
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False  # True is an int to Python, never a count or a rate here
    elif base == "int":
        ok = isinstance(value, numbers.Integral)
    elif base == "float":
        ok = isinstance(value, numbers.Real) and math.isfinite(value)
    elif base == "str":
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, dict)
    return None if ok else _describe(kind)


def _coerce(value: Any, kind: str) -> tuple[Any, str | None]:
    """``value`` as ``kind`` where that is exact (``"1e-3"`` -> 0.001, ``4.0`` -> 4), and what is wrong."""
    base = kind.partition("|")[0]
    if isinstance(value, str) and base in ("int", "float"):
        text = value.strip()
        try:
            value = int(text) if base == "int" and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            return value, _describe(kind)
    if base == "int" and isinstance(value, float) and not isinstance(value, bool):
        if not (math.isfinite(value) and value.is_integer()):
            return value, _describe(kind)
        value = int(value)
    if base == "float" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = float(value)
    return value, _type_problem(value, kind)
