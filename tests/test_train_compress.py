"""`tcssa compress` sharded across processes and resumed (issue 17), without torchrun: the ranks are
called one after another in this process."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from tcssa.io.checkpoints import save_model
from tcssa.io.features import slot_tokens_complete, write_h5
from tcssa.mil import build_model
from tcssa.train.compress import compress_folder, shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shards_are_disjoint_and_cover_every_item():
    items = list(range(11))
    for world in (1, 2, 3, 5, 11, 12):
        shares = [shard(items, rank, world) for rank in range(world)]
        together = sorted(i for share in shares for i in share)
        assert together == items  # every item once: no overlap, nothing left out
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(items, 2, 2)


def _folder(tmp_path, slides: int = 7):
    torch.manual_seed(0)
    model = build_model("tcssa", 6, 2, num_slots=3)
    checkpoint = save_model(tmp_path / "ckpt", model, {"model": model.config, "class_names": ["a", "b"]})
    features = tmp_path / "features"
    features.mkdir()
    gen = np.random.default_rng(0)
    for i in range(slides):
        write_h5(features / f"slide_{i}.h5", gen.standard_normal((5 + i, 6)).astype(np.float32))
    return checkpoint, features


def test_two_ranks_in_sequence_write_every_slide_once_and_a_rerun_resumes(tmp_path, capsys):
    checkpoint, features = _folder(tmp_path)
    out = tmp_path / "slots"
    written = [compress_folder(checkpoint, features, out, device="cpu", rank=r, world_size=2) for r in (0, 1)]
    names = [sorted(p.name for p in w) for w in written]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == [f"slide_{i}.h5" for i in range(7)]
    assert len(names[0]) == 4 and len(names[1]) == 3
    assert all(slot_tokens_complete(p, 3, 6, checkpoint) for w in written for p in w)
    # the same as one process compressing everything
    alone = compress_folder(checkpoint, features, tmp_path / "alone", device="cpu", rank=0, world_size=1)
    for path in alone:
        with h5py.File(path) as a, h5py.File(out / path.name) as b:
            np.testing.assert_array_equal(a["tokens"][()], b["tokens"][()])

    # a damaged output is written again, a complete one kept
    damaged = out / "slide_3.h5"
    with h5py.File(damaged, "a") as f:
        del f["topk_weight"]
    capsys.readouterr()
    again = [compress_folder(checkpoint, features, out, device="cpu", rank=r, world_size=2) for r in (0, 1)]
    assert [p.name for w in again for p in w] == ["slide_3.h5"]
    assert slot_tokens_complete(damaged, 3, 6, checkpoint)
    printed = capsys.readouterr().out
    assert "written again" in printed and "left as they are" in printed


def test_outputs_of_another_checkpoint_are_stale(tmp_path):
    checkpoint, features = _folder(tmp_path, slides=2)
    out = tmp_path / "slots"
    compress_folder(checkpoint, features, out, device="cpu", rank=0, world_size=1)
    other = save_model(tmp_path / "other", build_model("tcssa", 6, 2, num_slots=3), {"model": {}})
    assert not slot_tokens_complete(out / "slide_0.h5", 3, 6, other)
    assert not slot_tokens_complete(out / "slide_0.h5", 4, 6)  # another K
    (out / "broken.h5").write_bytes(b"not an h5 file")
    assert not slot_tokens_complete(out / "broken.h5", 3, 6)
    assert not slot_tokens_complete(out / "missing.h5", 3, 6)


def test_a_rerun_with_another_token_budget_writes_again(tmp_path):
    checkpoint, features = _folder(tmp_path, slides=2)
    out = tmp_path / "slots"
    compress_folder(checkpoint, features, out, device="cpu", rank=0, world_size=1)
    assert compress_folder(checkpoint, features, out, device="cpu", rank=0, world_size=1) == []
    again = compress_folder(checkpoint, features, out, device="cpu", token_budget=0.9, rank=0, world_size=1)
    assert len(again) == 2
    with h5py.File(again[0]) as f:
        assert f.attrs["coverage"] == 0.9
