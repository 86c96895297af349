import pytest
import torch
import torch.nn.functional as F

from tcssa.mil import MODEL_NAMES, MILModel, build_model

D, C, K = 6, 3, 4

# Tiny sizes keep every model fast; the architectures are the defaults otherwise.
TINY = {
    "tcssa": dict(expert_hidden=8, head_hidden=8),
    "abmil": dict(embed_dims=(8,), attention_dim=4),
    "abmil-gated": dict(embed_dims=(8,), attention_dim=4),
    "transmil": dict(dim=16, heads=2, num_landmarks=4, residual_kernel=5),
    "mean": dict(head_hidden=8),
    "max": dict(head_hidden=8),
    "random-k": dict(head_hidden=8),
    "kmeans-k": dict(head_hidden=8),
    "grid-k": dict(head_hidden=8),
}
ORDER_AWARE = {"transmil"}  # reads patches as a sequence: not permutation invariant


def make(name, seed=0, **kw):
    return build_model(name, D, C, num_slots=K, seed=seed, **{**TINY[name], **kw})


def slide(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    coords = torch.randperm(400, generator=gen)[:n]
    coords = torch.stack([coords % 20, coords // 20], dim=-1) * 256  # distinct grid positions
    return x, coords


def pad_batch(slides, pad_value=5.0, interleave=False, seed=0):
    """Pad slides into one batch; with ``interleave`` the padding sits between real patches."""
    total = max(x.shape[0] for x, _ in slides) + 3
    xs, masks, cs = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for x, coords in slides:
        n = x.shape[0]
        positions = torch.randperm(total, generator=gen)[:n].sort().values if interleave else torch.arange(n)
        xb = torch.full((total, D), pad_value)
        cb = torch.full((total, 2), 99_999, dtype=torch.long)
        mb = torch.zeros(total, dtype=torch.bool)
        xb[positions], cb[positions], mb[positions] = x, coords, True
        xs.append(xb), cs.append(cb), masks.append(mb)
    return torch.stack(xs), torch.stack(masks), torch.stack(cs)


def test_registry_names_and_errors():
    assert set(MODEL_NAMES) == set(TINY)
    with pytest.raises(ValueError, match="abmil.*transmil"):
        build_model("clam", D, C)
    with pytest.raises(ValueError, match="no option.*bogus"):
        build_model("mean", D, C, bogus=1)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mean", D, 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_and_interface(name):
    model = make(name).eval()
    assert isinstance(model, MILModel) and model.name == name
    x, mask, coords = pad_batch([slide(7, 1), slide(12, 2)])
    logits, losses = model(x, mask, coords)
    assert logits.shape == (2, C) and torch.isfinite(logits).all()
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    single, _ = model(*slide(9, 3)[:1], coords=slide(9, 3)[1])  # N x D means one slide
    assert single.shape == (1, C)
    expected_tokens = K if name == "tcssa" or name.endswith("-k") else None
    assert model.num_tokens == expected_tokens


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("interleave", [False, True])
def test_padding_never_changes_a_result(name, interleave):
    model = make(name).eval()
    slides = [slide(n, seed) for seed, n in enumerate([11, 2, 17, 5])]  # one slide with fewer than K patches
    x, mask, coords = pad_batch(slides, interleave=interleave)
    batched, batched_losses = model(x, mask, coords)
    for i, (xi, ci) in enumerate(slides):
        alone, alone_losses = model(xi.unsqueeze(0), coords=ci.unsqueeze(0))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    if name == "tcssa":  # losses are batch means of per-slide terms: check with a batch of one
        one, one_losses = model(x[:1], mask[:1], coords[:1])
        _, alone_losses = model(slides[0][0].unsqueeze(0))
        for key in alone_losses:
            torch.testing.assert_close(one_losses[key], alone_losses[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pad_values_do_not_matter(name):
    model = make(name).eval()
    slides = [slide(9, 4), slide(3, 5)]
    a, _ = model(*_xmc(pad_batch(slides, pad_value=0.0)))
    b, _ = model(*_xmc(pad_batch(slides, pad_value=-1e4)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _xmc(batch):
    x, mask, coords = batch
    return x, mask, coords


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_is_deterministic(name):
    model = make(name).eval()
    x, mask, coords = pad_batch([slide(10, 6), slide(6, 7)])
    a, la = model(x, mask, coords)
    b, lb = model(x, mask, coords)
    assert torch.equal(a, b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in ORDER_AWARE])
def test_permutation_invariance(name):
    model = make(name).eval()
    x, coords = slide(15, 8)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(9))
    a, _ = model(x, coords=coords)
    b, _ = model(x[perm], coords=coords[perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    torch.manual_seed(0)
    x, mask, coords = pad_batch([slide(13, 10), slide(8, 11), slide(20, 12)])
    logits, losses = model(x, mask, coords)
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2])) + sum(losses.values())
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bad_input_gets_a_clear_error(name):
    model = make(name).eval()
    x, coords = slide(8, 13)
    with pytest.raises(ValueError, match="dimension D=6"):
        model(torch.randn(1, 8, D + 1), coords=coords.unsqueeze(0))
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN.*patch 3"):
        model(bad, coords=coords)
    with pytest.raises(ValueError, match="mask"):
        model(x.unsqueeze(0), torch.ones(1, 7, dtype=torch.bool), coords.unsqueeze(0))
    with pytest.raises(ValueError, match="no real patch"):
        model(x.unsqueeze(0), torch.zeros(1, 8, dtype=torch.bool), coords.unsqueeze(0))
    with pytest.raises(ValueError, match="no patches"):
        model(torch.empty(1, 0, D))


def test_grid_k_without_coords_says_so():
    with pytest.raises(ValueError, match="grid-k.*coordinates"):
        make("grid-k")(torch.randn(1, 8, D))


def test_seed_sets_the_initial_weights_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = make("tcssa", seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = make("tcssa", seed=1)
    c = make("tcssa", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_rebuilds_the_model(name):
    model = make(name, seed=3)
    twin = build_model(**model.config)
    twin.load_state_dict(model.state_dict())  # same architecture: strict load works
    assert twin.config == model.config


def test_tcssa_losses_are_the_weighted_routing_terms():
    model = make("tcssa")
    assert model.compressor.num_slots == K
    x, mask, _ = pad_batch([slide(30, 14), slide(12, 15)])
    model.eval()
    _, losses = model(x, mask)
    out = model.routing(x, mask)
    assert set(losses) == {"switch", "entropy", "z"}
    torch.testing.assert_close(losses["switch"], 0.1 * out.losses["switch"])
    torch.testing.assert_close(losses["entropy"], 0.05 * out.losses["entropy"])
    torch.testing.assert_close(losses["z"], 0.1 * out.losses["z"])
    # In training, task + sum(losses) = task + lambda * L_aux of the same forward pass.
    model.train()
    torch.manual_seed(5)
    _, train_losses = model(x, mask)
    torch.manual_seed(5)
    aux = model.routing(x, mask).aux_loss
    torch.testing.assert_close(sum(train_losses.values()), 0.1 * aux)
    assert sum(train_losses.values()) > 0


def test_tcssa_head_follows_method():
    model = build_model("tcssa", 32, 2)
    layers = list(model.head.net)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Dropout", "Linear"]
    assert layers[1].out_features == 512 and layers[3].p == 0.3 and layers[4].out_features == 2
    assert model.compressor.num_slots == 32 and model.num_tokens == 32


def test_random_k_samples_differ_in_training_and_follow_the_seed():
    x, _ = slide(40, 16)
    a, b = make("random-k", seed=4).train(), make("random-k", seed=4).train()
    ta, tb = a.tokens(x), b.tokens(x)
    assert torch.equal(ta.assignment, tb.assignment)  # same seed, same samples
    assert not torch.equal(a.tokens(x).assignment, ta.assignment)  # fresh samples each step
    a.eval()
    assert torch.equal(a.tokens(x).assignment, a.tokens(x).assignment)
