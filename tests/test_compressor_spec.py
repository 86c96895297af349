"""Spec checks of the compressor's training-time behaviour, each written to fail on one plausible
error in ``tcssa.method.compressor``: the size of the routing noise, the expert dropout, the logits the
routing loss is taken from (the noisy ones, docs/METHOD.md), and the experts' initialisation.

The expectations are computed here, from docs/METHOD.md, not by calling the code under test.
"""

import math

import pytest
import torch

from tcssa import TCSSA

D = 16


def _zero_gate(model: TCSSA) -> TCSSA:
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.zero_()
    return model


# ------------------------------------------------------------------------------------- noise
def test_training_noise_on_the_gate_logits_has_std_sigma():
    """With a zero gate the clean logits are 0, so log P_jk - mean_k log P_jk is eps_jk - mean_k eps_jk,
    whose std is sigma * sqrt(1 - 1/K). Measured over 32 x 4000 draws from the default model."""
    torch.manual_seed(0)
    model = _zero_gate(TCSSA(D)).train()  # the defaults: K = 32, sigma = 0.1
    assert model.config.noise_std == 0.1
    k = model.num_slots
    with torch.no_grad():
        out = model(torch.randn(2, 2000, D))
    log_p = out.probs.double().log()
    centred = log_p - log_p.mean(dim=-1, keepdim=True)
    sigma = centred.std().item() / math.sqrt(1 - 1 / k)
    assert sigma == pytest.approx(0.1, rel=0.02)
    # and the noise is fresh per patch and per slot: no correlation between neighbouring slots
    corr = torch.corrcoef(torch.stack([centred[..., 0].flatten(), centred[..., 1].flatten()]))[0, 1]
    assert abs(corr.item() + 1 / (k - 1)) < 0.03  # centring alone gives -1/(K-1)
    model.eval()
    with torch.no_grad():
        clean = model(torch.randn(1, 100, D)).probs
    torch.testing.assert_close(clean, torch.full_like(clean, 1 / k))  # no noise in eval


# ----------------------------------------------------------------------------------- dropout
def _expert_probe(dropout: float = 0.25, hidden: int = 64, slides: int = 200) -> torch.Tensor:
    """The expert branch LN(W2 Dropout(GELU(W1 c))) with W1 = 0, b1 = 10 (so GELU(.) = 10 in every
    hidden unit), W2 = identity, b2 = 0 and D = H: the branch is LayerNorm of the dropped hidden vector,
    so a dropped unit shows as a value below the mean (all equal, 0, when nothing is dropped)."""
    torch.manual_seed(0)
    model = TCSSA(hidden, num_slots=4, expert_hidden=hidden, expert_dropout=dropout, noise_std=0.0)
    experts = model.experts
    with torch.no_grad():
        experts.w1.zero_()
        experts.b1.fill_(10.0)
        experts.w2.copy_(torch.eye(hidden).expand_as(experts.w2))
        experts.b2.zero_()
    experts.train()
    slots = torch.zeros(slides, 4, hidden)
    with torch.no_grad():
        return experts(slots)  # slots = 0: the output is the branch alone


def test_expert_dropout_zeroes_a_quarter_of_the_hidden_units_in_training():
    branch = _expert_probe()
    dropped = branch < branch.mean(dim=-1, keepdim=True) - 1e-3
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.01)  # 200 x 4 x 64 units
    # units are dropped independently per slot and per slide, not the same mask for every slot
    assert not torch.equal(dropped[:, 0], dropped[:, 1])
    assert not torch.equal(dropped[0], dropped[1])


def test_expert_dropout_makes_training_outputs_random_and_eval_outputs_fixed():
    """Noise off, so routing is identical between calls: only the dropout can make them differ."""
    torch.manual_seed(0)
    model = TCSSA(D, num_slots=4, expert_hidden=32, noise_std=0.0).train()  # default dropout 0.25
    x = torch.randn(2, 30, D)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a.topk_index, b.topk_index) and torch.equal(a.slots, b.slots)
        assert not torch.allclose(a.tokens, b.tokens)
        model.eval()
        assert torch.equal(model(x).tokens, model(x).tokens)
    # dropout 0 in training: the same tokens as eval
    torch.manual_seed(0)
    plain = TCSSA(D, num_slots=4, expert_hidden=32, noise_std=0.0, expert_dropout=0.0).train()
    with torch.no_grad():
        trained, evaluated = plain(x).tokens, plain.eval()(x).tokens
    torch.testing.assert_close(trained, evaluated)


# ------------------------------------------------------------- routing loss from noisy logits
def _aux_terms_by_hand(logits: torch.Tensor, mask: torch.Tensor, top_k: int = 2) -> dict[str, float]:
    """docs/METHOD.md's three terms, slide by slide in float64 over the real patches, then averaged."""
    terms = {"switch": [], "entropy": [], "z": []}
    for z, real in zip(logits.double(), mask, strict=True):
        z = z[real]
        k = z.shape[-1]
        p = z.softmax(-1)
        pbar = p.mean(0)
        top = torch.zeros_like(p).scatter(-1, p.topk(top_k, dim=-1).indices, 1.0)
        f = top.mean(0)
        terms["switch"].append(k * (pbar * f).sum().item())
        entropy = -(pbar * torch.log(pbar + 1e-8)).sum().item()
        terms["entropy"].append(1 - entropy / math.log(k))
        terms["z"].append(1e-4 * torch.logsumexp(z, -1).mean().item() ** 2)
    return {name: sum(values) / len(values) for name, values in terms.items()}


def test_routing_loss_is_computed_from_the_noisy_logits():
    """Under a fixed seed the training noise is the first draw of the forward pass, so the test can
    redraw it and compute the loss terms itself from z + eps; they must also differ measurably from
    the same terms on the clean z (else the check would prove nothing)."""
    torch.manual_seed(0)
    sigma = 0.1
    model = TCSSA(D, num_slots=8, expert_hidden=12, noise_std=sigma)
    with torch.no_grad():
        model.gate.weight.mul_(4.0)  # confident routing, as after training: Pbar far from uniform
    model.train()
    x = torch.randn(2, 60, D)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 35:] = False  # padded patches take no part

    torch.manual_seed(123)
    with torch.no_grad():
        out = model(x, mask)
    torch.manual_seed(123)
    eps = torch.randn(2, 60, 8) * sigma  # what randn_like(logits) * sigma draws
    with torch.no_grad():
        clean = x @ model.gate.weight.T + model.gate.bias
    noisy = clean + eps
    # the redrawn noise is the one the model used: its routing probabilities are softmax(z + eps)
    torch.testing.assert_close(out.probs, noisy.softmax(-1), atol=1e-6, rtol=1e-5)

    expected = _aux_terms_by_hand(noisy, mask)
    unwanted = _aux_terms_by_hand(clean, mask)
    tolerance = {"switch": 1e-5, "entropy": 1e-5, "z": 1e-8}
    for name, value in expected.items():
        assert abs(value - unwanted[name]) > 20 * tolerance[name], name  # noise matters to this term
        assert out.losses[name].item() == pytest.approx(value, abs=tolerance[name], rel=1e-5), name
    aux = expected["switch"] + 0.5 * expected["entropy"] + expected["z"]
    assert out.aux_loss.item() == pytest.approx(aux, abs=2e-5, rel=1e-5)


# --------------------------------------------------------------------------- initialisation
def test_experts_are_initialised_like_nn_linear():
    """nn.Linear's default init (kaiming_uniform_(a=sqrt(5)) and its bias rule) is U(-b, b) with
    b = 1/sqrt(fan_in), for weight and bias alike: fan_in = D for W1, b1 and H for W2, b2. The
    bound is read off nn.Linear itself, and the stacked experts must match it in range and spread."""
    dim, hidden = 64, 128
    torch.manual_seed(0)
    experts = TCSSA(dim, num_slots=32, expert_hidden=hidden).experts
    for weight, bias, fan_in, fan_out in (
        (experts.w1, experts.b1, dim, hidden),
        (experts.w2, experts.b2, hidden, dim),
    ):
        linear = torch.nn.Linear(fan_in, fan_out)
        bound = max(linear.weight.abs().max().item(), linear.bias.abs().max().item())
        assert bound == pytest.approx(1 / math.sqrt(fan_in), rel=0.02)  # what nn.Linear gives
        bound = 1 / math.sqrt(fan_in)
        for values in (weight, bias):
            values = values.detach().double()
            assert values.abs().max().item() <= bound
            assert values.abs().max().item() >= 0.98 * bound  # fills the whole range, too
            assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
            assert abs(values.mean().item()) < 0.05 * bound
        # and each expert is its own draw
        assert not torch.equal(weight[0], weight[1])
    assert torch.equal(experts.ln_weight, torch.ones(32, dim))
    assert torch.equal(experts.ln_bias, torch.zeros(32, dim))


# ------------------------------------------------------------------ bfloat16 routing statistics
BIG_N = 100_001  # above 2^16: bfloat16 spaces numbers this size 512 apart (N itself would be 99,840)


@pytest.fixture(scope="module")
def float32_and_bfloat16_models():
    import warnings

    torch.manual_seed(0)
    model32 = TCSSA(D, num_slots=32, expert_hidden=16).eval()
    model16 = TCSSA(D, num_slots=32, expert_hidden=16)
    model16.load_state_dict(model32.state_dict())
    with warnings.catch_warnings():  # the emulated-bfloat16 warning, if this CPU lacks the instructions
        warnings.simplefilter("ignore", RuntimeWarning)
        model16.bfloat16().eval()(torch.randn(3, D))
    # features that bfloat16 holds exactly, so that both models see the same input
    x = torch.randn(2, BIG_N, D, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    mask = torch.ones(2, BIG_N, dtype=torch.bool)
    mask[1, 70_000:] = False
    return model32, model16, x, mask


@pytest.mark.parametrize("masked", [False, True])
def test_bfloat16_routing_statistics_are_summed_in_float32(float32_and_bfloat16_models, masked):
    model32, model16, x, mask = float32_and_bfloat16_models
    mask = mask if masked else None
    with torch.no_grad():
        xb = x.bfloat16()
        sums = model16._sum_slide(xb, mask, model16._route(xb, mask))
        expected_real = [BIG_N, 70_000] if masked else [BIG_N, BIG_N]
        assert sums.num_real.tolist() == expected_real  # exact, not rounded to 99,840
        pbar = sums.prob_sum / sums.num_real.unsqueeze(-1)
        torch.testing.assert_close(
            pbar.sum(-1).double(), torch.ones(2, dtype=torch.float64), atol=1e-3, rtol=0
        )
        share = sums.slot_counts / sums.num_real.unsqueeze(-1)
        torch.testing.assert_close(
            share.sum(-1).double(), torch.full((2,), 2.0, dtype=torch.float64), atol=1e-4, rtol=0
        )

        out32, out16 = model32(x, mask), model16(x, mask)
    assert out16.tokens.dtype == torch.bfloat16
    for name in ("switch", "z"):
        assert out16.losses[name].item() == pytest.approx(out32.losses[name].item(), rel=2e-3), name
    # the entropy term is 1 - H/log K, here ~1e-3: in bfloat16 arithmetic it rounds to 0
    entropy32 = out32.losses["entropy"].item()
    assert entropy32 > 1e-4
    assert out16.losses["entropy"].item() == pytest.approx(entropy32, rel=0.05)


def test_bfloat16_uniform_routing_gives_the_exact_switch_loss(float32_and_bfloat16_models):
    """A zero gate routes uniformly (P = 1/32 exactly in bfloat16): L_switch = K (1/K) 2 = 2 and
    L_ent = 0 must hold at N = 100,001 in training mode too."""
    _, model16, x, mask = float32_and_bfloat16_models
    import copy

    uniform = _zero_gate(copy.deepcopy(model16))
    uniform.noise_std = 0.0
    uniform.train()
    with torch.no_grad():
        out = uniform(x, mask)
    assert out.losses["switch"].item() == pytest.approx(2.0, abs=1e-4)
    assert out.losses["entropy"].item() == pytest.approx(0.0, abs=1e-4)
    assert out.aux_loss.item() == pytest.approx(2.0 + 1e-4 * math.log(32) ** 2, abs=1e-4)


def test_routing_loss_functions_compute_in_float32_for_bfloat16_inputs():
    from tcssa.method import routing_loss as rl

    k = 32
    pbar = torch.full((1, k), 1 / k)
    pbar[0, 0] += 0.004  # H(Pbar) / log K = 0.99954...: 1 minus it is lost in bfloat16 arithmetic
    pbar[0, 1] -= 0.004
    pbar = pbar.bfloat16()
    expected = rl.entropy_loss(pbar.double()).item()  # the same (rounded) input, in float64
    got = rl.entropy_loss(pbar)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=0.05) and expected > 1e-4
    share = torch.full((1, k), 2 / k)
    assert rl.switch_loss(pbar, share.bfloat16()).dtype == torch.float32
    logits = torch.randn(1, 300, k)
    z = rl.z_loss(logits.bfloat16(), torch.ones(1, 300, dtype=torch.bool))
    assert z.dtype == torch.float32
    assert z.item() == pytest.approx(
        rl.z_loss(logits.bfloat16().float(), torch.ones(1, 300, dtype=torch.bool)).item()
    )
