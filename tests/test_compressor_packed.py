"""The unpadded batch path (``TCSSA.forward_slides``, issue 17): per slide, the same tokens,
losses and gradients as the one-slide and the padded, masked ``forward``."""

from __future__ import annotations

import pytest
import torch

from tcssa.data.batching import pad_slides
from tcssa.method.compressor import TCSSA
from tcssa.mil import build_model
from tcssa.mil.base import training_objective
from tcssa.train.config import TrainConfig
from tcssa.train.engine import fit
from train_fixtures import make_bags, pad_collate

LENGTHS = (5, 17, 3, 11)


def _slides(dim: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=gen, dtype=torch.float64) for n in LENGTHS]


def _model(**kwargs) -> TCSSA:
    torch.manual_seed(0)
    # no routing noise and no dropout: both draw differently on different paths
    return TCSSA(12, num_slots=6, expert_dropout=0.0, noise_std=0.0, **kwargs).double().train()


def _objective(out) -> torch.Tensor:
    # a loss that weights every slide's tokens differently, plus the routing loss
    scale = torch.arange(1, out.tokens.shape[0] + 1, dtype=out.tokens.dtype).view(-1, 1, 1)
    return (scale * out.tokens.square()).sum() + out.aux_loss


def _grads(model: TCSSA, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("packed", [False, True])
def test_forward_slides_equals_padded_forward_tokens_losses_and_gradients(packed):
    model, slides = _model(), _slides()
    x, mask = pad_slides(slides)
    padded = model(x, mask)
    out = model.forward_slides(torch.cat(slides), LENGTHS) if packed else model.forward_slides(slides)
    torch.testing.assert_close(out.tokens, padded.tokens)
    torch.testing.assert_close(out.slot_counts, padded.slot_counts)
    for name in ("switch", "entropy", "z"):
        torch.testing.assert_close(out.losses[name], padded.losses[name])
    torch.testing.assert_close(out.aux_loss, padded.aux_loss)
    assert out.aux_loss > 0  # training mode: the routing loss is on
    # the packed top-2 outputs are the padded ones without the padding
    torch.testing.assert_close(out.topk_index, padded.topk_index[mask])
    torch.testing.assert_close(out.topk_weight, padded.topk_weight[mask])
    for got, expected in zip(_grads(model, _objective(out)), _grads(model, _objective(padded)), strict=True):
        torch.testing.assert_close(got, expected)


def test_forward_slides_equals_each_slide_alone():
    model, slides = _model(), _slides(seed=1)
    out = model.forward_slides(slides)
    alone = [model(s) for s in slides]
    for i, one in enumerate(alone):
        torch.testing.assert_close(out.tokens[i], one.tokens[0])
    # the routing loss of the batch is the mean of the slides' own routing losses
    torch.testing.assert_close(out.aux_loss, torch.stack([o.aux_loss for o in alone]).mean())
    # gradients of a sum of per-slide objectives: the same whichever path
    expected = sum(o.tokens.square().sum() for o in alone)
    for got, want in zip(_grads(model, out.tokens.square().sum()), _grads(model, expected), strict=True):
        torch.testing.assert_close(got, want)


def test_forward_slides_eval_matches_compress_slides_and_keeps_probs():
    model, slides = _model(), _slides(seed=2)
    model.eval()
    out = model.forward_slides(slides, keep_probs=True)
    torch.testing.assert_close(out.tokens, model.compress_slides(slides, batch_size=2))
    assert out.probs.shape == (sum(LENGTHS), 6)
    assert model.forward_slides(slides).probs is None
    assert out.aux_loss == 0


def test_forward_slides_rejects_bad_input():
    model, slides = _model(), _slides()
    with pytest.raises(ValueError, match="lengths"):
        model.forward_slides(torch.cat(slides))
    with pytest.raises(ValueError, match="add up"):
        model.forward_slides(torch.cat(slides), [5, 5])
    with pytest.raises(ValueError, match="add up"):
        model.forward_slides(torch.cat(slides), [0, *LENGTHS])
    with pytest.raises(ValueError, match="not with a list"):
        model.forward_slides(slides, LENGTHS)
    with pytest.raises(ValueError, match="no slides"):
        model.forward_slides([])
    with pytest.raises(ValueError, match="slide 1"):
        model.forward_slides([slides[0], torch.stack([slides[1], slides[1]])])
    bad = slides[2].clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.forward_slides([slides[0], bad])


@pytest.mark.parametrize("center", [False, True])
def test_mil_list_of_slides_equals_padded_batch(center):
    torch.manual_seed(0)
    model = build_model(
        "tcssa", 12, 2, num_slots=6, expert_dropout=0.0, noise_std=0.0, head_dropout=0.0, center=center
    )
    model = model.double().train()
    slides, labels = _slides(seed=3), torch.tensor([0, 1, 1, 0])
    x, mask = pad_slides(slides)
    logits, losses = model.compute_loss(labels, slides)
    padded_logits, padded_losses = model.compute_loss(labels, x, mask)
    torch.testing.assert_close(logits, padded_logits)
    for name, value in padded_losses.items():
        torch.testing.assert_close(losses[name], value)
    params = list(model.parameters())
    got = torch.autograd.grad(training_objective(losses), params)
    expected = torch.autograd.grad(training_objective(padded_losses), params)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.predict(slides), model.predict(x, mask))
    with pytest.raises(ValueError, match="no mask"):
        model.routing(slides, mask)


# ---------------------------------------------------------------- mixed precision (issue 17)
def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=gen) * 2.0
    return torch.randn(n, dim, generator=gen) + centres[torch.randint(0, 8, (n,), generator=gen)]


def _agreement(a, b) -> float:
    return float((a.topk_index.sort(-1).values == b.topk_index.sort(-1).values).all(-1).float().mean())


@pytest.mark.filterwarnings("ignore:TCSSA is running in bfloat16")
@pytest.mark.parametrize("mode", ["bf16-gate", "bf16-aggregate"])
def test_mixed_precision_keeps_the_top2_choice_and_the_tokens(mode):
    torch.manual_seed(0)
    model = TCSSA(256, num_slots=16).eval()
    x = _clustered(4_000, 256, seed=1)
    with torch.inference_mode():
        full, full_listed = model(x), model.forward_slides([x[:1_000], x[1_000:]])
        low = model.set_mixed_precision(mode)(x)
        chunked = model.compress_chunks(x.split(1_500))
        listed = model.forward_slides([x[:1_000], x[1_000:]])
    assert model.mixed_precision == mode and low.tokens.dtype == torch.float32
    assert _agreement(full, low) >= 0.995
    if mode == "bf16-aggregate":  # the gate is float32: the same choice exactly
        assert torch.equal(full.topk_index, low.topk_index)
    rel = ((low.tokens - full.tokens).norm() / full.tokens.norm()).item()
    assert 0 < rel < 1e-2  # bfloat16 did run, and stayed within 1e-2
    # the bfloat16 product's output is rounded per chunk, so chunks agree to bfloat16 precision
    for got, expected in ((chunked.tokens, full.tokens), (listed.tokens, full_listed.tokens)):
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2
    assert listed.topk_index.shape == (4_000, 2)
    model.set_mixed_precision(None)
    with torch.inference_mode():
        torch.testing.assert_close(model(x).tokens, full.tokens, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:TCSSA is running in bfloat16")
def test_bf16_gate_refines_every_patch_with_an_infinite_margin():
    torch.manual_seed(0)
    model = TCSSA(64, num_slots=8).eval()
    x = _clustered(500, 64, seed=2)
    with torch.inference_mode():
        full = model(x)
        refined = model.set_mixed_precision("bf16-gate", tie_margin=float("inf"))(x)
    assert torch.equal(full.topk_index, refined.topk_index)  # every gate product redone in float32
    torch.testing.assert_close(refined.topk_weight, full.topk_weight)
    assert model.tie_margin == float("inf")


def test_mixed_precision_rejects_bad_settings():
    model = TCSSA(8, num_slots=4)
    with pytest.raises(ValueError, match="one of"):
        model.set_mixed_precision("fp8")
    with pytest.raises(ValueError, match="tie_margin"):
        model.set_mixed_precision("bf16-gate", tie_margin=-1)
    with pytest.raises(ValueError, match="float32 model"):
        model.bfloat16().set_mixed_precision("bf16-gate")


# ---------------------------------------------------------------- TCSSAMIL(unpadded=True) in the trainer
def _mil(unpadded: bool, **kwargs):
    torch.manual_seed(0)
    options = dict(num_slots=4, expert_dropout=0.0, noise_std=0.0, head_dropout=0.0, unpadded=unpadded)
    return build_model("tcssa", 8, 2, **options, **kwargs)


@pytest.mark.parametrize("center", [False, True])
def test_unpadded_option_gives_the_padded_numbers(center):
    padded, unpadded = _mil(False, center=center).double(), _mil(True, center=center).double()
    gen = torch.Generator().manual_seed(4)
    slides = [torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (7, 2, 5)]
    x, mask = pad_slides(slides)
    labels = torch.tensor([1, 0, 1])
    grads = []
    for model in (padded, unpadded):
        logits, losses = model.compute_loss(labels, x, mask)
        grads.append((logits, torch.autograd.grad(training_objective(losses), list(model.parameters()))))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)
    # a mask that is not a prefix takes the padded path: the same numbers still
    shuffled = torch.tensor([[True, False, True, True, True, True, True]] + [[True] * 7] * 2)
    torch.testing.assert_close(padded(x, shuffled)[0], unpadded(x, shuffled)[0])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore::tcssa.train.metrics.SlotCollapseWarning")
def test_trainer_fits_the_unpadded_model_to_the_padded_weights():
    items = make_bags(20, dim=8)
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=4)
    weights = []
    for unpadded in (False, True):
        model = _mil(unpadded)
        fit(model, items[:14], items[14:], config, collate=pad_collate)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # compiling takes a minute or more on a CPU
def test_compiled_compressor_gives_the_eager_tokens():
    model = _model().float().eval()
    compiled = torch.compile(model, dynamic=True)
    x = _clustered(300, 12, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x).tokens, model(x).tokens, rtol=1e-4, atol=1e-5)


def test_token_budget_and_spatial_take_the_padded_path():
    # token_budget needs the B x N top-2 outputs, spatial the coordinates: a list is padded first
    model = _mil(True, token_budget=0.9).double()
    gen = torch.Generator().manual_seed(6)
    slides = [torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (6, 3)]
    x, mask = pad_slides(slides)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(model.compute_loss(labels, slides)[0], model.compute_loss(labels, x, mask)[0])
    assert model.routing(slides).topk_index.shape == (2, 6, 2)
    with pytest.raises(ValueError, match="coordinates"):
        _mil(True, spatial=True).double()(slides)
