"""Ordered LM batches (Transformer-XL semantics, DDP rank slices, resume) and the copy-memory task."""

import numpy as np
import pytest
import torch

from deqlm.config import DataConfig
from deqlm.data.copy_memory import make_copy_memory
from deqlm.data.dataset import build_dataset
from deqlm.data.errors import DataError
from deqlm.data.iterators import LMOrderedIterator

N, B, L = 1003, 4, 7  # 1003 // 4 = 250 tokens per column -> 249 targets -> 35 full segments + one of 4


def stream() -> np.ndarray:
    return np.arange(N, dtype=np.uint32)  # every token names its own position


def test_eval_pass_sees_every_target_of_every_column_exactly_once():
    batches = list(LMOrderedIterator(stream(), B, L, loop=False))
    assert len(batches) == 36 and batches[-1][0].shape == (B, 249 - 35 * L)
    y = torch.cat([y_BL for _, y_BL in batches], dim=1)
    x = torch.cat([x_BL for x_BL, _ in batches], dim=1)
    cols = torch.arange(B * 250).view(B, 250)
    assert torch.equal(y, cols[:, 1:]) and torch.equal(x, cols[:, :-1])
    assert all(x_BL.dtype == torch.long for x_BL, _ in batches)


def test_training_keeps_full_segments_and_loops_over_epochs():
    it = LMOrderedIterator(stream(), B, L, loop=True)
    assert len(it) == 35
    first = [next(it) for _ in range(35)]
    assert all(x_BL.shape == (B, L) for x_BL, _ in first)
    assert it.state_dict() == {"epoch": 0, "position": 35}
    x_BL, _ = next(it)
    assert torch.equal(x_BL, first[0][0]) and it.state_dict() == {"epoch": 1, "position": 1}
    targets = torch.cat([y_BL for _, y_BL in first], dim=1)
    assert targets.unique().numel() == targets.numel() == B * 35 * L  # no target twice in an epoch


def test_memory_order_each_segment_continues_the_previous_one_in_every_row():
    it = LMOrderedIterator(stream(), B, L, loop=False)
    prev_x, _ = next(it)
    for x_BL, _ in it:
        assert torch.equal(x_BL[:, 0], prev_x[:, -1] + 1)
        prev_x = x_BL


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_are_contiguous_columns_whose_union_is_the_single_process_batch(world_size):
    single = LMOrderedIterator(stream(), B, L)
    ranks = [LMOrderedIterator(stream(), B, L, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(40):
        x_BL, y_BL = next(single)
        parts = [next(it) for it in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x_BL)
        assert torch.equal(torch.cat([p[1] for p in parts]), y_BL)


def test_resuming_from_a_saved_position_gives_the_same_batches():
    ref = LMOrderedIterator(stream(), B, L)
    expected = [next(ref) for _ in range(80)]
    it = LMOrderedIterator(stream(), B, L)
    for _ in range(50):
        next(it)
    state = it.state_dict()
    resumed = LMOrderedIterator(stream(), B, L)
    resumed.load_state_dict(state)
    for want in expected[50:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_batch_geometry_and_state_are_data_errors():
    with pytest.raises(DataError, match="divisible"):
        LMOrderedIterator(stream(), 6, L, world_size=4)
    with pytest.raises(DataError, match="no full segment"):
        LMOrderedIterator(stream(), 500, L)
    with pytest.raises(DataError, match="outside"):
        LMOrderedIterator(stream(), B, L).load_state_dict({"epoch": 0, "position": 99})


def test_copy_memory_follows_the_tcn_convention():
    T = 30
    x_NL, y_NL = make_copy_memory(64, T, seed=5)
    assert x_NL.shape == y_NL.shape == (64, T + 20)
    assert ((x_NL[:, :10] >= 1) & (x_NL[:, :10] <= 8)).all()
    assert (x_NL[:, 10 : T + 9] == 0).all() and (x_NL[:, T + 9 :] == 9).all()
    assert (y_NL[:, : T + 10] == 0).all() and (y_NL[:, T + 10 :] == x_NL[:, :10]).all()
    assert np.array_equal(make_copy_memory(64, T, seed=5)[0], x_NL)


def test_copy_memory_dataset_shuffles_per_epoch_and_resumes():
    ds = build_dataset(DataConfig(dataset="copy", copy_T=20, copy_n_train=100, copy_n_test=30))
    assert (ds.vocab_size, ds.n_classes, ds.carry_mems) == (10, 10, False)
    it = ds.train_iterator(batch_size=20, tgt_len=0)
    epoch0 = torch.cat([next(it)[0] for _ in range(5)])
    epoch1 = torch.cat([next(it)[0] for _ in range(5)])
    assert epoch0.shape == (100, 40) and not torch.equal(epoch0, epoch1)
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, epoch1.tolist()))  # same samples
    state = it.state_dict()
    want = next(it)
    resumed = ds.train_iterator(batch_size=20, tgt_len=0)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], want[0])
    test = list(ds.eval_batches("test", batch_size=8, tgt_len=0))
    assert sum(x.shape[0] for x, _ in test) == 30 and ds.split_tokens("test") == 30 * 40


def test_copy_memory_validation_is_its_own_set_not_the_test_set():
    cfg = DataConfig(dataset="copy", copy_T=20, copy_n_train=100, copy_n_test=30, copy_n_valid=30)
    ds = build_dataset(cfg)
    valid = torch.cat([x for x, _ in ds.eval_batches("valid", 10)])
    test = torch.cat([x for x, _ in ds.eval_batches("test", 10)])
    train = {tuple(r) for r in ds.train_x_NL[:, :10].tolist()}
    assert valid.shape == test.shape == (30, 40) and not torch.equal(valid, test)
    assert not any(tuple(r) in train for r in valid[:, :10].tolist())  # 8^10 sequences: no accidental overlap
