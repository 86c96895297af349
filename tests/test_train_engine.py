import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from accelerate.state import AcceleratorState

from tcssa.io.checkpoints import load_training_state
from tcssa.train.config import TrainConfig
from tcssa.train.engine import (
    NonFiniteLossError,
    SlideTooLargeError,
    evaluate,
    fit,
    plan_epoch,
    process_state,
    warmup_factor,
)
from train_fixtures import TinyMIL, TinySlotMIL, make_bags, pad_collate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(items):
    return items[:24], items[24:32], items[32:]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=k)


def test_same_seed_gives_the_same_model_and_metrics():
    train, val, test = _split(make_bags(40))
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=2)
    runs = []
    for _ in range(2):
        model = TinySlotMIL(seed=3)  # noise and dropout in training: RNG must be reseeded
        result = fit(model, train, val, config, collate=pad_collate)
        preds = evaluate(model, test, collate=pad_collate)
        runs.append((_weights(model), result.history, preds.probs))
    _assert_same_weights(runs[0][0], runs[1][0])
    assert not torch.distributed.is_initialized()  # a single process joins no process group
    assert [h["val_loss"] for h in runs[0][1]] == [h["val_loss"] for h in runs[1][1]]
    assert (runs[0][2] == runs[1][2]).all()

    other = TinySlotMIL(seed=3)
    fit(other, train, val, config.override(seed=1), collate=pad_collate)
    assert not torch.equal(other.head.weight, runs[0][0]["head.weight"])


@pytest.mark.parametrize("batch_size,accum", [(2, 2), (1, 4)])
def test_an_update_averages_over_its_slides_however_they_are_split(batch_size, accum):
    # 4 slides per update in one padded pass, or in several passes with gradient accumulation.
    train, val, _ = _split(make_bags(40))
    reference = TinyMIL()
    fit(reference, train, val, TrainConfig(epochs=2, lr=1e-2, batch_size=4), collate=pad_collate)
    model = TinyMIL()
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=batch_size, grad_accum_steps=accum)
    fit(model, train, val, config, collate=pad_collate)
    _assert_same_weights(_weights(reference), _weights(model), atol=1e-6)


def test_plan_deals_every_slide_of_an_update_to_one_process():
    config = TrainConfig(batch_size=2, grad_accum_steps=2)
    single = plan_epoch(10, config, fold=0, epoch=1, rank=0, world_size=1)
    ranks = [plan_epoch(10, config, fold=0, epoch=1, rank=r, world_size=3) for r in range(3)]
    for update in range(3):  # 10 slides in updates of 4, 4, 2
        slides = [i for u, _, idx, _ in single if u == update for i in idx]
        dealt = [i for plan in ranks for u, _, idx, size in plan if u == update and size for i in idx]
        assert sorted(dealt) == sorted(slides)
        # a process with nothing to do in the 2-slide update still runs one weight-0 pass
        assert all(any(u == update for u, *_ in plan) for plan in ranks)
    assert [size for u, _, _, size in ranks[2] if u == 2] == [0]


def test_each_epoch_tells_the_training_set_which_epoch_it_is():
    # BagDataset draws its --max-patches subset per (seed, epoch): it must hear of every epoch
    train, val, _ = _split(make_bags(40))

    class Recording(list):
        epochs: list[int] = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    fit(TinyMIL(), Recording(train), val, TrainConfig(epochs=3, lr=1e-3), collate=pad_collate)
    assert Recording.epochs == [1, 2, 3]


def test_evaluation_is_deterministic_and_padding_free():
    _, _, test = _split(make_bags(40))
    model = TinySlotMIL()
    one = evaluate(model, test, collate=pad_collate, batch_size=1, with_routing=True)
    padded = evaluate(model, test, collate=pad_collate, batch_size=5, with_routing=True)
    assert one.slide_ids == [bag.slide_id for bag, _ in test]
    torch.testing.assert_close(torch.tensor(one.probs), torch.tensor(padded.probs), atol=1e-6, rtol=1e-5)
    assert (one.slot_counts == padded.slot_counts).all()
    # top-2 routing: every real patch is counted twice
    assert one.slot_counts.sum() == 2 * sum(bag.features.shape[0] for bag, _ in test)


def test_early_stopping_keeps_the_best_epoch():
    train, val, _ = _split(make_bags(40, signal=3.0))
    flipped_val = [(bag, 1 - label) for bag, label in val]  # learning the task makes val worse
    model = TinyMIL()
    config = TrainConfig(epochs=30, lr=5e-2, early_stopping_patience=3, lr_patience=10)
    result = fit(model, train, flipped_val, config, collate=pad_collate)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 3 < 30
    best = min(result.history, key=lambda h: h["val_loss"])
    assert best["epoch"] == result.best_epoch
    again = evaluate(model, flipped_val, collate=pad_collate)
    assert again.loss == pytest.approx(result.best_val_loss, abs=1e-6)


class FailingAfter:
    """A dataset that raises after ``limit`` reads, as if the process died mid-epoch."""

    def __init__(self, items, limit, error=KeyboardInterrupt):
        self.items, self.limit, self.reads, self.error = items, limit, 0, error

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise self.error("interrupted")
        return self.items[i]


@pytest.mark.parametrize("warmup_epochs", [0.0, 3.0])  # 3: the warm-up spans the interruption
def test_resume_after_an_interruption_mid_epoch_gives_the_same_result(tmp_path, warmup_epochs):
    train, val, _ = _split(make_bags(40))
    config = TrainConfig(epochs=4, lr=1e-2, batch_size=2, warmup_epochs=warmup_epochs)
    whole = TinySlotMIL()
    expected = fit(whole, train, val, config, collate=pad_collate, out_dir=tmp_path / "whole")

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # dies in epoch 3, after 2 complete epochs
        fit(TinySlotMIL(), FailingAfter(train, 2 * 24 + 7), val, config, collate=pad_collate, out_dir=cut)
    assert load_training_state(cut / "resume.safetensors")["progress"]["epoch"] == 2

    resumed = TinySlotMIL(seed=99)  # the weights come from the saved state, not from this init
    result = fit(resumed, train, val, config, collate=pad_collate, out_dir=cut, resume=True)
    _assert_same_weights(_weights(whole), _weights(resumed))
    assert result.best_epoch == expected.best_epoch
    drop = lambda h: {k: v for k, v in h.items() if k != "seconds"}
    assert [drop(h) for h in result.history] == [drop(h) for h in expected.history]
    lines = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]


def test_warmup_factor_ramps_linearly_over_the_warmup_epochs():
    # 4 updates per epoch, 2 warm-up epochs: 1/8, 2/8, ..., 8/8, then 1
    shares = [warmup_factor(2.0, epoch, update, 4) for epoch in (1, 2, 3) for update in range(4)]
    assert shares == pytest.approx([k / 8 for k in range(1, 9)] + [1.0] * 4)
    assert warmup_factor(0.0, 1, 0, 4) == 1.0
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-1)


def test_warmup_scales_the_steps_but_not_the_scheduled_rate():
    train, val, _ = _split(make_bags(40))
    plain, warmed = TinyMIL(), TinyMIL()
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=4)
    a = fit(plain, train, val, config, collate=pad_collate)
    b = fit(warmed, train, val, config.override(warmup_epochs=2), collate=pad_collate)
    assert not torch.equal(plain.head.weight, warmed.head.weight)
    assert [h["lr"] for h in a.history] == [h["lr"] for h in b.history] == [1e-2, 1e-2]


class NaNAfter(FailingAfter):
    def __getitem__(self, i):
        self.reads += 1
        bag, label = self.items[i]
        if self.reads > self.limit:
            bag = type(bag)(bag.features * math.nan, bag.slide_id)
        return bag, label


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    train, val, _ = _split(make_bags(40))
    config = TrainConfig(epochs=5, lr=1e-2, batch_size=2)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*loss is nan.*last complete epoch"):
        fit(TinyMIL(), NaNAfter(train, 24 + 5), val, config, collate=pad_collate, out_dir=tmp_path)
    state = load_training_state(tmp_path / "resume.safetensors")
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert (tmp_path / "model.safetensors").is_file()


class AllocationFails(TinyMIL):
    def forward(self, x, mask=None, coords=None):
        if x.shape[1] > 10:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
            )
        return super().forward(x, mask, coords)


def test_a_slide_too_large_for_memory_names_it_and_suggests_max_patches():
    train, val, _ = _split(make_bags(40))
    with pytest.raises(SlideTooLargeError, match=r"slide_\d+ \(1[12] patches\).*--max-patches"):
        fit(AllocationFails(), train, val, TrainConfig(epochs=1), collate=pad_collate)


def test_running_out_of_memory_while_padding_a_batch_names_the_slides():
    train, val, _ = _split(make_bags(40))

    def collate(items):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    class Named(list):
        slide_ids = [bag.slide_id for bag, _ in train]

    with pytest.raises(SlideTooLargeError, match=r"reading and padding.*slide_0\d\d.*--max-patches"):
        fit(TinyMIL(), Named(train), val, TrainConfig(epochs=1), collate=collate)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, config, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    # A forked child inherits the parent's Accelerate state (one process, set up by the tests before):
    # start afresh, so that the first process_state joins the process group these variables describe.
    AcceleratorState._reset_state(reset_partial_state=True)
    state = process_state("cpu")
    assert state.num_processes == world_size and state.process_index == rank
    train, val, test = _split(make_bags(40))
    model = TinyMIL()
    result = fit(model, train, val, config, collate=pad_collate, out_dir=os.path.dirname(out))
    preds = evaluate(model, test, collate=pad_collate)
    if state.is_main_process:
        torch.save({"weights": _weights(model), "history": result.history, "probs": preds.probs}, out)
    state.destroy_process_group()


def test_two_processes_train_the_same_model_as_one(tmp_path):
    # 5 slides per update: uneven shares (3 + 2) and a last update of 4 slides.
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=5)
    (tmp_path / "ddp").mkdir()
    out = tmp_path / "ddp" / "ddp.pt"
    # fork: the children reuse the imported torch instead of importing it again (seconds each).
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), config, str(out)), nprocs=2, join=True, start_method="fork"
    )
    ddp = torch.load(out, weights_only=False)

    train, val, test = _split(make_bags(40))
    model = TinyMIL()
    result = fit(model, train, val, config, collate=pad_collate, out_dir=tmp_path / "one")
    _assert_same_weights(_weights(model), ddp["weights"], atol=1e-6)
    # Adam hides a constant factor on the gradient; its first moment (a running mean of the
    # gradients) does not, so it checks that each update applies the mean over its slides.
    moments = [
        load_training_state(tmp_path / run / "resume.safetensors")["optimizer"]["state"]
        for run in ("one", "ddp")
    ]
    for index, state in moments[0].items():
        torch.testing.assert_close(state["exp_avg"], moments[1][index]["exp_avg"], atol=1e-7, rtol=1e-4)
    for one, two in zip(result.history, ddp["history"], strict=True):
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-5)
        assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5)
    preds = evaluate(model, test, collate=pad_collate)
    torch.testing.assert_close(torch.tensor(preds.probs), torch.tensor(ddp["probs"]), atol=1e-6, rtol=1e-5)


class Overflowing(FailingAfter):
    """Finite features so large (3e38) that the logits overflow to Inf, on the named slides."""

    def __init__(self, items, slides):
        super().__init__(items, limit=0)
        self.slides = set(slides)

    def __getitem__(self, i):
        bag, label = self.items[i]
        if bag.slide_id in self.slides:
            bag = type(bag)(torch.full_like(bag.features, 3e38), bag.slide_id)
        return bag, label


def test_logits_that_overflow_in_training_name_the_slide():
    train, val, _ = _split(make_bags(40))
    bad = train[5][0].slide_id
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=2)
    with pytest.raises(NonFiniteLossError) as info:
        fit(TinyMIL(), Overflowing(train, [bad]), val, config, collate=pad_collate)
    message = str(info.value)
    assert "fold 0, epoch 1" in message and f"NaN or Inf for 1 of 2 slide(s): {bad}." in message
    assert "feature files" in message and "last complete epoch" in message


def test_outputs_that_overflow_on_a_validation_or_test_slide_name_it():
    train, val, test = _split(make_bags(40))
    bad_val, bad_test = val[2][0].slide_id, test[1][0].slide_id
    config = TrainConfig(epochs=2, lr=1e-2)
    with pytest.raises(
        NonFiniteLossError, match=rf"fold 0, epoch 1, validation set: .*1 of 8 slide\(s\): {bad_val}\."
    ):
        fit(TinyMIL(), train, Overflowing(val, [bad_val]), config, collate=pad_collate)
    model = TinyMIL()
    with pytest.raises(
        NonFiniteLossError, match=rf"^fold 3 test: .*NaN or Inf for 1 of 8 slide\(s\): {bad_test}\."
    ):
        evaluate(model, Overflowing(test, [bad_test]), collate=pad_collate, batch_size=3, desc="fold 3 test")


def test_weights_that_are_no_longer_finite_are_reported_as_divergence():
    _, _, test = _split(make_bags(40))
    model = TinyMIL()
    with torch.no_grad():
        model.head.weight.fill_(math.inf)
    with pytest.raises(
        NonFiniteLossError, match=r"weights are NaN or Inf \(head.weight\).*diverged, lower --lr"
    ):
        evaluate(model, test, collate=pad_collate)
