"""TrainConfig from YAML: every option checked against its field's type, errors naming key, value, file."""

import re

import pytest

from tcssa.train.config import TrainConfig


def _yaml(tmp_path, text):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_numbers_pyyaml_reads_as_strings_become_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3, without a dot, as the string "1e-3"
    config = TrainConfig.from_yaml(
        _yaml(tmp_path, "lr: 1e-3\nweight_decay: 5E-4\nepochs: 3.0\nwarmup_epochs: 1\n")
    )
    assert config.lr == 0.001 and isinstance(config.lr, float)
    assert config.weight_decay == 5e-4
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.warmup_epochs == 1.0 and isinstance(config.warmup_epochs, float)
    assert TrainConfig.from_yaml(_yaml(tmp_path, "max_patches: null\n")).max_patches is None
    assert TrainConfig.from_yaml(_yaml(tmp_path, "max_patches: '8000'\n")).max_patches == 8000


@pytest.mark.parametrize(
    "line,message",
    [
        ("epochs: 1.5", "option 'epochs' must be a whole number, got 1.5"),
        ("batch_size: '2.5'", "option 'batch_size' must be a whole number, got '2.5'"),
        ("lr: fast", "option 'lr' must be a finite number, got 'fast'"),
        ("lr: .nan", "option 'lr' must be a finite number, got nan"),
        ("folds: yes", "option 'folds' must be a whole number, got True"),
        ("model: 3", "option 'model' must be text, got 3"),
        ("device: [cpu]", "option 'device' must be text, got ['cpu']"),
        ("max_patches: lots", "option 'max_patches' must be a whole number or null, got 'lots'"),
        ("model_options: 0.2", "option 'model_options' must be a mapping (option: value), got 0.2"),
        ("seed: null", "option 'seed' must be a whole number, got None"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_file_the_key_and_the_value(tmp_path, line, message):
    path = _yaml(tmp_path, line + "\n")
    with pytest.raises(ValueError) as info:
        TrainConfig.from_yaml(path)
    assert str(info.value) == f"{path}: {message}"


def test_a_value_out_of_range_names_the_file(tmp_path):
    path = _yaml(tmp_path, "epochs: 0\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: epochs must be >= 1, got 0$"):
        TrainConfig.from_yaml(path)


@pytest.mark.parametrize("text", ["", "# all defaults\n", "null\n", "~\n"])
def test_an_empty_or_null_config_file_is_an_error_naming_it(tmp_path, text):
    path = _yaml(tmp_path, text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: the config file holds no options"):
        TrainConfig.from_yaml(path)


@pytest.mark.parametrize("text,kind", [("- lr: 1\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_a_config_that_is_not_a_mapping_names_the_file_and_what_it_is(tmp_path, text, kind):
    path = _yaml(tmp_path, text)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(path))}: expected a mapping of option: value, got {kind}"
    ):
        TrainConfig.from_yaml(path)


def test_option_names_that_are_not_text_name_the_file(tmp_path):
    path = _yaml(tmp_path, "1: 2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: option names must be text, got \[1\]"):
        TrainConfig.from_yaml(path)


def test_the_constructor_checks_types_too():
    with pytest.raises(ValueError, match="lr must be a finite number, got '1e-3'"):
        TrainConfig(lr="1e-3")
    with pytest.raises(ValueError, match="epochs must be a whole number, got 1.5"):
        TrainConfig().override(epochs=1.5)
    assert TrainConfig(lr=1).lr == 1  # an int is a number; the defaults stay as they were
