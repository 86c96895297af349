"""The compressor's shortcuts give the same results as the general path."""

import pytest
import torch

from tcssa import TCSSA
from tcssa.io.checkpoints import upgrade_expert_layout


def test_no_mask_equals_an_all_true_mask_in_eval_and_training():
    torch.manual_seed(0)
    model = TCSSA(16, num_slots=6, expert_hidden=8, noise_std=0.0, expert_dropout=0.0)
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(1))
    for train in (False, True):
        model.train(train)
        plain, masked = model(x), model(x, torch.ones(3, 50, dtype=torch.bool))
        torch.testing.assert_close(plain.tokens, masked.tokens, atol=0, rtol=0)
        assert torch.equal(plain.topk_index, masked.topk_index)
        assert torch.equal(plain.slot_counts, masked.slot_counts)
        torch.testing.assert_close(plain.aux_loss, masked.aux_loss)
        for name, value in plain.losses.items():
            torch.testing.assert_close(masked.losses[name], value)


def test_huge_finite_features_are_not_mistaken_for_nan():
    # The cheap finiteness check sums all logits; that sum may overflow for huge finite features.
    torch.manual_seed(0)
    model = TCSSA(8, num_slots=4, expert_hidden=8).eval()
    x = torch.full((1, 4000, 8), 3e34)
    with torch.no_grad():
        model.gate.weight.fill_(1.0)
    logits_sum = model.gate(x).sum()
    assert not torch.isfinite(logits_sum)  # the shortcut fails here ...
    out = model(x)  # ... and the full check finds every logit finite
    assert out.tokens.shape == (1, 4, 8)


def test_compress_slides_equals_each_slide_alone_in_input_order():
    torch.manual_seed(0)
    model = TCSSA(16, num_slots=5, expert_hidden=8).eval()
    gen = torch.Generator().manual_seed(1)
    slides = [torch.randn(n, 16, generator=gen) for n in (40, 7, 300, 1, 9, 120)]
    tokens = model.compress_slides(slides, batch_size=4)
    assert tokens.shape == (6, 5, 16)
    for slide, got in zip(slides, tokens, strict=True):
        torch.testing.assert_close(got, model(slide).tokens[0], atol=1e-5, rtol=1e-5)
    assert model.compress_slides([]).shape == (0, 5, 16)
    bad = [slides[0], slides[1].clone()]
    bad[1][3, 2] = float("nan")
    with pytest.raises(ValueError, match="slide 1.*NaN or Inf"):
        model.compress_slides(bad)
    with pytest.raises(ValueError, match="eval"):
        model.train().compress_slides(slides)


def test_fast_top2_and_logsumexp_match_the_plain_ones():
    torch.manual_seed(0)
    model = TCSSA(16, num_slots=7, expert_hidden=8).eval()
    x = torch.randn(2, 500, 16) * 3
    routing = model._route(x, None)
    logits = model.gate(x)
    values, index = logits.softmax(-1).topk(2, dim=-1)
    assert torch.equal(routing.topk_index, index)
    torch.testing.assert_close(routing.topk_weight, values)
    torch.testing.assert_close(routing.lse, torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-6)


def test_checkpoint_of_the_earlier_expert_layout_loads_transposed():
    # Before the (in, out) layout the experts were stored (out, in), with no layout marker; with
    # D = H the shapes alone cannot tell the two apart.
    torch.manual_seed(0)
    model = TCSSA(16, num_slots=3, expert_hidden=16).eval()
    old = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("layout_version")}
    for name in ("experts.w1", "experts.w2"):
        old[name] = old[name].transpose(1, 2).contiguous()
    fresh = TCSSA(16, num_slots=3, expert_hidden=16).eval()
    with pytest.raises(RuntimeError, match="layout_version"):  # loaded as it is, the marker is missing
        fresh.load_state_dict(old)
    fresh.load_state_dict(upgrade_expert_layout(old))
    x = torch.randn(1, 40, 16)
    torch.testing.assert_close(fresh(x).tokens, model(x).tokens, atol=0, rtol=0)
    assert "experts.layout_version" in model.state_dict()
    again = TCSSA(16, num_slots=3, expert_hidden=16).eval()
    again.load_state_dict(model.state_dict())  # the current layout loads as it is
    torch.testing.assert_close(again(x).tokens, model(x).tokens, atol=0, rtol=0)
