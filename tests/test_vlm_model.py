import pytest
import torch

from tcssa.vlm.model import SlideLMConfig, causal_lm_loss, collate, position_ids_from, supervised_positions
from tcssa.vlm.prompts import IGNORE_INDEX, assemble, to_conversation, tokenize_conversation
from vlm_helpers import D, mc_item, tiny_lm, tiny_slidelm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm(tokenizer)


def encode(tokenizer, model, item, num_patches, generation=False):
    turns = to_conversation(item).turns
    turns = turns[:1] if generation else turns
    tokenized = tokenize_conversation(tokenizer, turns, add_generation_prompt=generation)
    return assemble(tokenized, model.config.num_slide_tokens(num_patches), tokenizer.pad_token_id)


def make_batch(tokenizer, model, items, slides, side="right", generation=False):
    samples = [encode(tokenizer, model, it, len(s), generation) for it, s in zip(items, slides, strict=True)]
    return collate(samples, slides, [it.slide_id for it in items], tokenizer.pad_token_id, side)


def slides_of(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=gen) for n in lengths]


ITEMS = [
    mc_item("q1", "s1", "A"),
    mc_item("q2", "s2", "C", question="Is a lesion present in this slide with invasive growth?"),
    mc_item("q3", "s3", "D", question="Which?"),
]


@pytest.mark.parametrize("variant", ["slots", "random-k", "mean", "blind"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(tokenizer, lm, variant, side):
    model = tiny_slidelm(lm, variant, num_tokens=4)
    slides = slides_of([9, 3, 17])  # slide 2 has fewer patches than K: random-k takes all 3
    batch = make_batch(tokenizer, model, ITEMS, slides, side)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # really padded
    with torch.no_grad():
        _, together_losses = model.compute_loss(batch)
        together = model(**batch.model_inputs())
        for row, (item, slide) in enumerate(zip(ITEMS, slides, strict=True)):
            alone_batch = make_batch(tokenizer, model, [item], [slide], side)
            alone = model(**alone_batch.model_inputs())
            real = batch.attention_mask[row].bool()
            torch.testing.assert_close(together.logits[row, real], alone.logits[0], atol=1e-4, rtol=1e-4)
    # The batch loss is the token-weighted mean of the per-sample losses.
    per_sample, counts = [], []
    for item, slide in zip(ITEMS, slides, strict=True):
        one = make_batch(tokenizer, model, [item], [slide], side)
        with torch.no_grad():
            per_sample.append(model.compute_loss(one)[1]["lm"])
        counts.append(int((one.labels[:, 1:] != IGNORE_INDEX).sum()))
    expected = sum(loss * n for loss, n in zip(per_sample, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(together_losses["lm"], expected, atol=1e-5, rtol=1e-5)


def test_slide_tokens_fill_exactly_the_image_span(tokenizer, lm):
    model = tiny_slidelm(lm, "slots", num_tokens=4)
    slides = slides_of([9, 5])
    batch = make_batch(tokenizer, model, ITEMS[:2], slides, "left")
    embeds, _ = model.inputs_embeds(batch.input_ids, batch.image_mask, batch.features, batch.feature_mask)
    tokens, _, _ = model.slide_tokens(batch.features, batch.feature_mask)
    projected = model.projector(tokens)
    for row in range(2):
        torch.testing.assert_close(embeds[row, batch.image_mask[row]], projected[row])
        text = ~batch.image_mask[row]
        torch.testing.assert_close(embeds[row, text], lm.get_input_embeddings()(batch.input_ids[row, text]))
    # labels: nothing before or inside the slide span is supervised; the answer is.
    train = make_batch(tokenizer, model, ITEMS[:2], slides, "right")
    assert (train.labels[train.image_mask] == IGNORE_INDEX).all()
    first_answer = (train.labels[0] != IGNORE_INDEX).nonzero().min()
    assert first_answer > train.image_mask[0].nonzero().max()
    assert tokenizer.decode(train.labels[0, train.labels[0] != IGNORE_INDEX]).strip().startswith("A")


def test_feature_padding_never_changes_slide_tokens(lm):
    model = tiny_slidelm(lm, "slots")
    slide = slides_of([7])[0]
    mask = torch.tensor([[True] * 7 + [False] * 5])
    padded = torch.cat([slide, torch.full((5, D), 1e3)]).unsqueeze(0)
    a = model.slide_tokens(slide.unsqueeze(0), torch.ones(1, 7, dtype=torch.bool))[0]
    b = model.slide_tokens(padded, mask)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mean = tiny_slidelm(lm, "mean")
    torch.testing.assert_close(mean.slide_tokens(padded, mask)[0][0, 0], slide.mean(0))


def test_random_k_is_deterministic_in_eval_and_samples_only_real_patches(lm):
    model = tiny_slidelm(lm, "random-k", num_tokens=4)
    slide = torch.arange(10 * D, dtype=torch.float32).reshape(1, 10, D)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    seeds = torch.tensor([123])
    a = model.slide_tokens(slide, mask, seeds)[0]
    b = model.slide_tokens(slide, mask, seeds)[0]
    assert torch.equal(a, b)
    rows = (a[0, :, 0] / D).long().tolist()
    assert len(set(rows)) == 4 and all(r < 6 for r in rows)


def test_left_padded_generation_matches_single_prompts(tokenizer, lm):
    model = tiny_slidelm(lm, "slots")
    slides = slides_of([9, 3, 17])
    batch = make_batch(tokenizer, model, ITEMS, slides, "left", generation=True)
    assert batch.labels is None
    options = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    together = model.generate(batch, max_new_tokens=5, **options)
    for row, (item, slide) in enumerate(zip(ITEMS, slides, strict=True)):
        alone = model.generate(make_batch(tokenizer, model, [item], [slide], "left", True), 5, **options)
        assert together[row].tolist() == alone[0].tolist()
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(make_batch(tokenizer, model, ITEMS, slides, "right", True))


def test_continuation_logprobs_match_a_full_forward(tokenizer, lm):
    model = tiny_slidelm(lm, "slots")
    slides = slides_of([9, 3])
    batch = make_batch(tokenizer, model, ITEMS[:2], slides, "left")
    lengths = [2, 3]
    scores = model.continuation_logprobs(batch, lengths)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits.log_softmax(-1)
    width = batch.input_ids.shape[1]
    for row, n in enumerate(lengths):
        expected = sum(logits[row, t - 1, batch.input_ids[row, t]] for t in range(width - n, width))
        torch.testing.assert_close(scores[row], expected, atol=1e-5, rtol=1e-5)


def test_mismatched_span_and_bad_features_are_clear_errors(tokenizer, lm):
    slots = tiny_slidelm(lm, "slots", num_tokens=4)
    mean = tiny_slidelm(lm, "mean")
    slides = slides_of([9])
    batch = make_batch(tokenizer, mean, ITEMS[:1], slides)  # a 1-token span
    with pytest.raises(ValueError, match="do not match the slide tokens"):
        slots(**batch.model_inputs())
    with pytest.raises(ValueError, match="12-d patch features"):
        slots.slide_tokens(torch.zeros(1, 3, D + 1), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="slide_tokens must be one of"):
        SlideLMConfig(feature_dim=D, lm_hidden=32, slide_tokens="median")


def test_gradients_reach_projector_and_compressor_through_the_lm(tokenizer, lm):
    model = tiny_slidelm(lm, "slots").train()
    for p in model.lm.parameters():
        p.requires_grad_(False)
    batch = make_batch(tokenizer, model, ITEMS, slides_of([9, 3, 17]))
    out, losses = model.compute_loss(batch)
    assert out.aux_loss.item() > 0  # the compressor trains: its routing loss is part of the objective
    assert losses["aux"] == model.config.aux_loss_weight * out.aux_loss
    sum(losses.values()).backward()
    assert model.projector[0].weight.grad.abs().sum() > 0
    assert model.compressor.gate.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_position_ids_ignore_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_prefill_flops_count_attention_and_grow_with_slide_tokens(lm):
    from tcssa.vlm.prefill import TEXT_TOKENS, measure_prefill

    runs = measure_prefill(lm, [4, 30, 60], repeats=1, progress=False)
    assert [r.sequence_length for r in runs] == [4 + TEXT_TOKENS, 30 + TEXT_TOKENS, 60 + TEXT_TOKENS]
    assert runs[2].gflops > runs[1].gflops > runs[0].gflops > 0 and runs[0].flops_ratio_vs_first == 1.0
    # Attention is counted: with QK^T and PV (4 n^2 h per layer) taken out, what is left grows
    # linearly in the sequence length n (projections, MLPs; one position's logits).
    cfg = lm.config
    rest = [r.gflops - 4 * r.sequence_length**2 * cfg.hidden_size * cfg.num_hidden_layers / 1e9 for r in runs]
    n = [r.sequence_length for r in runs]
    slope_a = (rest[1] - rest[0]) / (n[1] - n[0])
    slope_b = (rest[2] - rest[1]) / (n[2] - n[1])
    assert slope_a == pytest.approx(slope_b, rel=1e-6)


def test_loss_from_the_supervised_positions_only_equals_the_loss_over_all_logits(tokenizer, lm):
    model = tiny_slidelm(lm, "slots", num_tokens=4)
    batch = make_batch(tokenizer, model, ITEMS, slides_of([9, 3, 17]), "right")
    with torch.no_grad():
        out, losses = model.compute_loss(batch)
        full = model(**batch.model_inputs()).logits
    positions = supervised_positions(batch.labels)
    assert out.logits.shape[1] == len(positions) < full.shape[1]  # fewer logits computed
    shifted = full[:, :-1].reshape(-1, full.shape[-1])
    expected = torch.nn.functional.cross_entropy(shifted, batch.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(losses["lm"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_lm_loss(full, batch.labels), expected, atol=1e-5, rtol=1e-5)


def test_blind_variant_sees_no_slide(tokenizer, lm):
    model = tiny_slidelm(lm, "blind", num_tokens=4)
    assert model.config.num_slide_tokens(100) == 0
    first = make_batch(tokenizer, model, ITEMS[:1], slides_of([9]), "left")
    second = make_batch(tokenizer, model, ITEMS[:1], slides_of([30], seed=5), "left")
    assert not first.image_mask.any()
    with torch.no_grad():
        a = model(**first.model_inputs()).logits
        b = model(**second.model_inputs()).logits
    torch.testing.assert_close(a, b)  # other features, the same answer: the slide is not read


def test_one_pass_letter_scoring_equals_one_sequence_per_option(tokenizer, lm):
    """When every option's reply is one token (a letter, for SmolLM2's tokenizer) the prompt is scored
    once; that must pick what scoring each option's own sequence picks."""
    from tcssa.vlm.evaluate import _predict_by_next_token, _predict_by_option_sequences

    model = tiny_slidelm(lm, "slots", num_tokens=4)
    items = ITEMS * 3
    slides = slides_of([9, 3, 17, 5, 11, 8, 20, 4, 6], seed=3)
    letter_ids = {k: (tokenizer.convert_tokens_to_ids(k),) for k in "ABCD"}
    replies = [[letter_ids[k] for k, _ in item.options] for item in items]
    with torch.no_grad():
        fast = _predict_by_next_token(model, tokenizer, items, slides, replies, "cpu")
        slow = _predict_by_option_sequences(model, tokenizer, items, slides, replies, "cpu")
    assert fast == slow and len(fast) == len(items)
