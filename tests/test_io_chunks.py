import h5py
import numpy as np
import pytest
import torch

from tcssa import TCSSA
from tcssa.io.chunks import compress_h5, feature_shape, iter_h5_chunks

D = 24


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return TCSSA(D, num_slots=6, expert_hidden=16, **kw).eval()


def write(path, features, dataset="features"):
    with h5py.File(path, "w") as f:
        f[dataset] = features
        f["coords"] = np.zeros((len(features), 2), dtype=np.int64)
    return path


@pytest.fixture
def slide(tmp_path):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(1037, D, generator=gen) * 2).half()
    return write(tmp_path / "slide-01.h5", x.numpy()), x


@pytest.mark.parametrize("chunk_size", [1, 100, 1037, 5000])
def test_compress_h5_matches_the_in_memory_forward(slide, chunk_size):
    path, x = slide
    model = make()
    whole = model(x.float())
    streamed = compress_h5(model, path, chunk_size=chunk_size, keep_probs=True)
    torch.testing.assert_close(streamed.tokens, whole.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(streamed.slots, whole.slots, atol=1e-4, rtol=1e-4)
    assert torch.equal(streamed.topk_index, whole.topk_index)
    torch.testing.assert_close(streamed.topk_weight, whole.topk_weight)
    torch.testing.assert_close(streamed.probs, whole.probs)
    assert torch.equal(streamed.slot_counts, whole.slot_counts)
    assert streamed.slot_counts.sum() == 2 * len(x)
    for name, value in whole.losses.items():
        torch.testing.assert_close(streamed.losses[name], value, atol=1e-6, rtol=1e-5)
    assert streamed.aux_loss.item() == 0


def test_compress_h5_does_not_keep_probs_by_default(slide):
    out = compress_h5(make(), slide[0], chunk_size=256)
    assert out.probs is None
    assert out.topk_index.shape == (1, 1037, 2)


def test_bfloat16_model_streams_bfloat16_chunks(slide):
    path, x = slide
    model = make().bfloat16()
    chunks = list(iter_h5_chunks(path, 500, dtype=torch.bfloat16))
    assert [c.dtype for c in chunks] == [torch.bfloat16] * 3
    assert torch.equal(torch.cat(chunks), x.to(torch.bfloat16))
    out = compress_h5(model, path, chunk_size=500)
    assert out.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(out.tokens, model(x.to(torch.bfloat16)).tokens, atol=0.05, rtol=0.02)


def test_feature_shape_and_clam_layout(slide, tmp_path):
    path, x = slide
    assert feature_shape(path) == (1037, D)
    batched = write(tmp_path / "clam.h5", x.numpy()[None])  # CLAM's 1 x N x D layout
    assert feature_shape(batched) == (1037, D)
    assert torch.equal(torch.cat(list(iter_h5_chunks(batched, 400))), x.float())


def test_training_mode_is_refused(slide):
    with pytest.raises(ValueError, match="eval"):
        compress_h5(make().train(), slide[0])


def test_bad_files_raise_clear_errors(tmp_path):
    model = make()
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        compress_h5(model, tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="junk.h5 is not a readable HDF5"):
        compress_h5(model, junk)
    no_features = write(tmp_path / "nofeat.h5", np.zeros((3, D), np.float32), dataset="feats")
    with pytest.raises(ValueError, match="nofeat.h5 has no 'features'"):
        compress_h5(model, no_features)
    wrong_dim = write(tmp_path / "dim.h5", np.zeros((3, D + 1), np.float32))
    with pytest.raises(ValueError, match="D=24"):
        compress_h5(model, wrong_dim)
    empty = write(tmp_path / "empty.h5", np.zeros((0, D), np.float32))
    with pytest.raises(ValueError, match="empty.h5.*N = 0"):
        compress_h5(model, empty)
    ints = write(tmp_path / "ints.h5", np.zeros((3, D), np.int32))
    with pytest.raises(ValueError, match="ints.h5.*floating-point"):
        compress_h5(model, ints)
    with pytest.raises(ValueError, match="chunk_size"):
        compress_h5(model, write(tmp_path / "ok.h5", np.zeros((3, D), np.float32)), chunk_size=0)


def test_nan_is_reported_with_file_and_global_patch_index(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, D)).astype(np.float32)
    x[257, 3] = np.nan
    path = write(tmp_path / "nan-slide.h5", x)
    with pytest.raises(ValueError, match="nan-slide.h5.*NaN or Inf.*patch 257"):
        compress_h5(make(), path, chunk_size=100)


@pytest.mark.slow
def test_a_million_patch_slide_streams_in_bounded_memory(tmp_path):
    from tcssa.bench import measure_h5_streaming

    result = measure_h5_streaming(tmp_path, num_patches=1_000_000, dim=1024)
    assert result["peak_rss_mib"] < 1024
