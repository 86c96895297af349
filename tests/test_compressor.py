import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_tcssa import ReferenceTCSSA
from tcssa import TCSSA
from tcssa.io.published import from_published, load_published, to_published
from tcssa.method import routing_loss as rl

D = 16


def make(num_slots=8, dim=D, seed=0, **kw):
    torch.manual_seed(seed)
    return TCSSA(dim, num_slots=num_slots, expert_hidden=12, **kw)


def feats(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_result_fields():
    model = make().eval()
    out = model(feats(3, 50, D))
    assert out.tokens.shape == (3, 8, D)
    assert out.topk_index.shape == (3, 50, 2) and out.topk_index.dtype == torch.long
    assert out.topk_weight.shape == (3, 50, 2)
    assert out.slot_counts.shape == (3, 8)
    assert set(out.losses) == {"switch", "entropy", "z"}
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0  # eval
    single = model(feats(50, D))  # N x D means B = 1
    assert single.tokens.shape == (1, 8, D)


def test_default_hyperparameters_follow_method():
    model = TCSSA(32)
    cfg = model.config
    assert (cfg.num_slots, cfg.top_k, cfg.expert_hidden, cfg.expert_dropout, cfg.noise_std) == (
        32,
        2,
        512,
        0.25,
        0.1,
    )
    assert rl.AUX_LOSS_WEIGHT == 0.1


def test_eval_is_deterministic_and_training_is_noisy():
    model = make()
    x = feats(2, 40, D)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a.tokens, b.tokens)
    model.train()
    c, d = model(x), model(x)
    assert not torch.equal(c.probs, d.probs)  # exploration noise
    assert c.aux_loss.item() > 0


def test_permutation_invariance():
    model = make().eval()
    x = feats(1, 70, D)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(3))
    a, b = model(x), model(x[:, perm])
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.slot_counts, b.slot_counts)
    for name in a.losses:
        torch.testing.assert_close(a.losses[name], b.losses[name])


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    pad_extra=st.integers(0, 9),
    pad_value=st.sampled_from([0.0, 1e3, -7.5]),
    seed=st.integers(0, 10_000),
)
def test_padding_never_changes_a_result(lengths, pad_extra, pad_value, seed):
    model = make(num_slots=6, seed=seed % 7, noise_std=0.0, expert_dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    slides = [torch.randn(n, D, generator=gen) for n in lengths]
    width = max(lengths) + pad_extra
    x = torch.full((len(slides), width, D), pad_value)
    mask = torch.zeros(len(slides), width, dtype=torch.bool)
    for i, s in enumerate(slides):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    model.eval()
    batched = model(x, mask)
    alone = [model(s) for s in slides]
    for i, (s, one) in enumerate(zip(slides, alone, strict=False)):
        torch.testing.assert_close(batched.tokens[i], one.tokens[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.slot_counts[i], one.slot_counts[0])
        assert (batched.topk_index[i, len(s) :] == -1).all()
        assert (batched.topk_weight[i, len(s) :] == 0).all()
    # Training mode (noise off so that it is comparable): the aux loss of the padded batch
    # is the mean of each slide's aux loss alone.
    model.train()
    batched_aux = model(x, mask).aux_loss
    alone_aux = torch.stack([model(s).aux_loss for s in slides]).mean()
    torch.testing.assert_close(batched_aux, alone_aux, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_slots,top_k", [(8, 2), (1, 2), (5, 3), (4, 1)])
def test_every_real_patch_gets_exactly_min_topk_slots(num_slots, top_k):
    model = make(num_slots=num_slots, top_k=top_k).eval()
    x = feats(2, 30, D)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 17:] = False
    out = model(x, mask)
    k = min(top_k, num_slots)
    assert out.topk_index.shape[-1] == k
    assert out.slot_counts[0].sum() == 30 * k
    assert out.slot_counts[1].sum() == 17 * k
    real = out.topk_index[1, :17]
    assert all(len(set(row.tolist())) == k for row in real)  # k distinct slots per patch
    assert (out.topk_weight[0] > 0).all()


def test_topk_weights_are_not_renormalised():
    model = make().eval()
    out = model(feats(1, 25, D))
    picked = out.probs.gather(-1, out.topk_index)
    torch.testing.assert_close(out.topk_weight, picked)
    assert (out.topk_weight.sum(-1) < 1).all()


def test_aux_terms_for_uniform_routing():
    k = 8
    model = make(num_slots=k, noise_std=0.0)
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.zero_()
    model.train()
    out = model(feats(1, 40, D))
    # Pbar = 1/K everywhere, f sums to 2 over slots: switch = K * (1/K) * 2 = 2.
    torch.testing.assert_close(out.losses["switch"], torch.tensor(2.0))
    torch.testing.assert_close(out.losses["entropy"], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.losses["z"], torch.tensor(1e-4 * math.log(k) ** 2))
    torch.testing.assert_close(out.aux_loss, torch.tensor(2.0 + 1e-4 * math.log(k) ** 2))


def test_aux_terms_for_collapsed_routing():
    k = 8
    model = make(num_slots=k, noise_std=0.0)
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.zero_()
        model.gate.bias[3] = 60.0  # every patch: P = e_3 (to float precision)
    model.train()
    out = model(feats(1, 40, D))
    # Pbar = e_3, f_3 = 1 (and one other slot takes every second choice): switch = K * 1 * 1.
    torch.testing.assert_close(out.losses["switch"], torch.tensor(float(k)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.losses["entropy"], torch.tensor(1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.losses["z"], torch.tensor(1e-4 * 60.0**2), atol=1e-6, rtol=1e-5)
    assert out.slot_counts[0, 3] == 40


def test_routing_loss_functions_on_hand_made_statistics():
    pbar = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    share = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert rl.switch_loss(pbar, share).item() == pytest.approx(4 * (0.5 + 0.5))
    expected_entropy = 1 - (-2 * 0.5 * math.log(0.5 + 1e-8) - 2 * 0.0) / math.log(4)
    assert rl.entropy_loss(pbar).item() == pytest.approx(expected_entropy, abs=1e-6)
    logits = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    mean_lse = (math.log(2) + 1 + math.log(2)) / 2
    assert rl.z_loss(logits, mask).item() == pytest.approx(1e-4 * mean_lse**2)
    assert rl.entropy_loss(torch.ones(2, 1)).tolist() == [0.0, 0.0]  # K = 1


def test_gradients_reach_the_gate_through_the_aggregation_weights():
    model = make(expert_dropout=0.0).eval()  # eval: aux loss is 0, so only the aggregation path remains
    x = feats(2, 30, D)
    out = model(x)
    assert out.aux_loss.item() == 0
    out.tokens.square().sum().backward()
    assert model.gate.weight.grad is not None
    assert model.gate.weight.grad.abs().sum() > 0
    assert model.experts.w1.grad.abs().sum() > 0


def test_aux_loss_trains_the_gate():
    model = make(noise_std=0.0).train()
    model(feats(1, 30, D)).aux_loss.backward()
    assert model.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("wrap", ["bare", "prefixed", "checkpoint"])
def test_reference_checkpoint_load_reproduces_published_forward(wrap):
    torch.manual_seed(0)
    ref = ReferenceTCSSA(D, num_slots=8, hidden=12).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine, so a mix-up would show
        for expert in ref.experts:
            expert.net[4].weight.uniform_(0.5, 1.5)
            expert.net[4].bias.uniform_(-0.5, 0.5)
    state = ref.state_dict()
    if wrap == "prefixed":
        state = {f"compressor.{k}": v for k, v in state.items()}
    elif wrap == "checkpoint":
        state = {
            "epoch": 3,
            "model_state_dict": {
                **{f"compressor.{k}": v for k, v in state.items()},
                "classifier.0.weight": torch.zeros(2, D),
                "attention.gate.weight": torch.zeros(1, D),  # another "gate" that is not ours
            },
        }
    ours = load_published(TCSSA(D, num_slots=8, expert_hidden=12), state).eval()
    x = feats(300, D, seed=5)
    ref_tokens, ref_losses = ref(x)
    out = ours(x)
    torch.testing.assert_close(out.tokens[0], ref_tokens, atol=1e-5, rtol=1e-5)
    for name, value in ref_losses.items():
        torch.testing.assert_close(out.losses[name], value, atol=1e-6, rtol=1e-5)

    # Export back to the published layout: a fresh reference module loads it strictly.
    fresh = ReferenceTCSSA(D, num_slots=8, hidden=12).eval()
    fresh.load_state_dict(to_published(ours), strict=True)
    torch.testing.assert_close(fresh(x)[0], ref_tokens, atol=0, rtol=0)
    built = from_published(state).eval()
    torch.testing.assert_close(built(x).tokens, out.tokens, atol=0, rtol=0)


def test_reference_checkpoint_errors_are_clear():
    with pytest.raises(ValueError, match="not a TC-SSA reference checkpoint"):
        load_published(TCSSA(D), {"foo.weight": torch.zeros(1)})
    ref = ReferenceTCSSA(D, num_slots=4, hidden=12).state_dict()
    with pytest.raises(ValueError, match="K=4"):
        load_published(TCSSA(D, num_slots=8, expert_hidden=12), ref)
    del ref["experts.2.net.3.bias"]
    with pytest.raises(ValueError, match="expert 2 lacks"):
        load_published(TCSSA(D, num_slots=4, expert_hidden=12), ref)


def test_more_slots_than_patches_and_empty_slots_are_zero():
    model = make(num_slots=8).eval()
    one = model(feats(1, D))
    assert one.tokens.shape == (1, 8, D)
    assert one.slot_counts.sum() == 2
    empty = one.slot_counts[0] == 0
    assert empty.sum() == 6
    assert (one.slots[0, empty] == 0).all()  # c_k = 0 for a slot that receives no patch
    assert torch.isfinite(one.tokens).all()
    three = model(feats(3, D))
    assert three.slot_counts.sum() == 6


@pytest.mark.parametrize(
    "x,mask,message",
    [
        (torch.zeros(1, 0, D), None, "no patches"),
        (torch.zeros(2, 5, D + 1), None, "feature dimension D=16"),
        (torch.zeros(2, 3, 4, D), None, "B x N x D"),
        (torch.zeros(5, D, dtype=torch.long), None, "floating-point"),
        (torch.zeros(2, 5, D), torch.ones(2, 4, dtype=torch.bool), "mask must have shape"),
        (torch.zeros(2, 5, D), torch.tensor([[True] * 5, [False] * 5]), "batch index \\[1\\]"),
    ],
)
def test_bad_input_raises_clear_value_error(x, mask, message):
    with pytest.raises(ValueError, match=message):
        make()(x, mask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_raise(bad):
    x = feats(2, 10, D)
    x[1, 4, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*batch index 1, patch 4"):
        make().eval()(x)


def test_half_precision_features_are_cast_to_the_model_dtype():
    model = make().eval()
    x = feats(1, 20, D)
    torch.testing.assert_close(model(x.half()).tokens, model(x.half().float()).tokens)


@pytest.mark.slow
def test_two_hundred_thousand_patches():
    torch.manual_seed(0)
    model = TCSSA(256, num_slots=32).eval()
    x = torch.randn(1, 200_000, 256)
    with torch.inference_mode():
        out = model(x)
    assert out.tokens.shape == (1, 32, 256)
    assert out.slot_counts.sum() == 400_000
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_without_the_instructions_warns_once(monkeypatch, native):
    import warnings

    from tcssa import runtime

    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: native)
    runtime.warn_once_if_cpu_lacks_bfloat16.cache_clear()
    model = TCSSA(16, num_slots=4, expert_hidden=8).eval().bfloat16()
    x = torch.randn(50, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
        model(x)
        TCSSA(16, num_slots=4, expert_hidden=8).eval()(x)  # float32: never warns
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == (0 if native else 1)
    if messages:
        assert "without bfloat16 instructions" in messages[0] and "float32" in messages[0]
    runtime.warn_once_if_cpu_lacks_bfloat16.cache_clear()
