"""Prefill FLOPs of published LM architectures, from their configs alone (meta device, no weights)."""

import csv
import math

import pytest

pytest.importorskip("transformers")

from tcssa.vlm import prefill  # noqa: E402
from tcssa.vlm.prefill import (  # noqa: E402
    PUBLISHED_LM_CONFIGS,
    TEXT_TOKENS,
    analytic_prefill_flops,
    counted_prefill_flops,
    default_small_lm,
    meta_lm,
    prefill_flops_table,
    published_lm_config,
)


def test_published_configs_are_the_released_architectures():
    small, large = published_lm_config("Qwen2.5-0.5B"), published_lm_config("qwen/qwen2.5-7b")
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (896, 4864, 24)
    assert (small.num_attention_heads, small.num_key_value_heads, small.vocab_size) == (14, 2, 151936)
    assert (large.hidden_size, large.intermediate_size, large.num_hidden_layers) == (3584, 18944, 28)
    assert (large.num_attention_heads, large.num_key_value_heads, large.vocab_size) == (28, 4, 152064)
    with pytest.raises(ValueError, match="unknown published LM"):
        published_lm_config("Qwen2.5-72B")


@pytest.mark.parametrize("name", list(PUBLISHED_LM_CONFIGS))
def test_closed_form_equals_flop_counter_on_the_meta_model(name):
    config = published_lm_config(name)
    lm = meta_lm(config)
    assert next(lm.parameters()).is_meta
    length = 1_000 + TEXT_TOKENS  # (the FLOPs of T = 96 are checked by the closed form below)
    assert counted_prefill_flops(lm, length) == analytic_prefill_flops(config, length)
    # by hand at T = 96 for the 0.5B: 24 layers x (q, o 2 x 2TD^2; k, v 2 x 2TD x 128; MLP 6TDI; 4T^2 D)
    if name == "Qwen2.5-0.5B":
        t, d = 96, 896
        layer = 4 * t * d * d + 4 * t * d * 128 + 6 * t * d * 4864 + 4 * t * t * d
        assert analytic_prefill_flops(config, t) == 24 * layer + 2 * d * 151936


def test_closed_form_equals_flop_counter_on_the_toy_lm_on_cpu():
    """The same count on real CPU kernels (the attention kernel mapped as in measure_prefill)."""
    lm = default_small_lm()
    for length in (4 + TEXT_TOKENS, 100 + TEXT_TOKENS):
        assert counted_prefill_flops(lm, length) == analytic_prefill_flops(lm.config, length)
    toy = analytic_prefill_flops(lm.config, 38_400 + TEXT_TOKENS) / analytic_prefill_flops(lm.config, 96)
    assert toy == pytest.approx(18_084, rel=1e-3)  # the ratio the toy reports, which does not transfer


def test_prefill_table_for_real_shapes():
    rows = prefill_flops_table(count=False)
    table = {(r.model, r.patch_tokens): r for r in rows}
    assert set(table) == {(m, n) for m in PUBLISHED_LM_CONFIGS for n in (1_000, 10_000, 38_400)}
    expected = {  # FLOPs ratio, N patch tokens vs 32 slot tokens, 64 text tokens in both
        ("Qwen2.5-0.5B", 1_000): 12.31,
        ("Qwen2.5-0.5B", 10_000): 228.1,
        ("Qwen2.5-0.5B", 38_400): 2218.6,
        ("Qwen2.5-7B", 1_000): 11.40,
        ("Qwen2.5-7B", 10_000): 136.8,
        ("Qwen2.5-7B", 38_400): 871.4,
    }
    for key, ratio in expected.items():
        row = table[key]
        assert row.ratio == pytest.approx(ratio, rel=1e-3), key
        assert row.flops_patches == analytic_prefill_flops(published_lm_config(key[0]), key[1] + TEXT_TOKENS)
        # between linear growth and quadratic growth in the sequence length
        lengths = (key[1] + TEXT_TOKENS) / (32 + TEXT_TOKENS)
        assert lengths < row.ratio < lengths**2
    assert table[("Qwen2.5-0.5B", 1_000)].flops_slots == 69_767_692_288
    assert table[("Qwen2.5-7B", 38_400)].flops_patches == 1_095_853_304_971_264


def test_prefill_command_for_a_published_name_counts_on_the_meta_device(tmp_path, monkeypatch, capsys):
    small = {**PUBLISHED_LM_CONFIGS["Qwen2.5-0.5B"], "num_hidden_layers": 2}  # 2 layers: fast, same widths
    monkeypatch.setitem(PUBLISHED_LM_CONFIGS, "Qwen2.5-0.5B", small)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    out = tmp_path / "prefill.csv"
    measurements = prefill.run_prefill_benchmark("Qwen2.5-0.5B", [1000, 32], out)
    assert [m.slide_tokens for m in measurements] == [32, 1000]
    config = published_lm_config("Qwen2.5-0.5B")
    assert measurements[1].gflops * 1e9 == pytest.approx(analytic_prefill_flops(config, 1000 + TEXT_TOKENS))
    assert math.isnan(measurements[1].seconds)
    assert "meta device" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert [int(r["slide_tokens"]) for r in rows] == [32, 1000]


def test_long_prefills_take_their_flops_from_the_meta_copy_and_untimed_ones_get_no_time(monkeypatch):
    lm = default_small_lm()
    short = prefill.measure_prefill(lm, [8, 40], repeats=1, progress=False)
    monkeypatch.setattr(prefill, "LONG_PREFILL", 50)  # 40 + 64 text tokens now counts as long
    long = prefill.measure_prefill(lm, [8, 40, 200], repeats=1, progress=False, max_timed_tokens=100)
    assert [m.gflops for m in long[:2]] == pytest.approx([m.gflops for m in short])  # same count either way
    assert long[2].gflops * 1e9 == analytic_prefill_flops(lm.config, 200 + TEXT_TOKENS)
    assert math.isnan(long[2].seconds) and not math.isnan(long[1].seconds)
