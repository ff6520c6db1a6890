"""Token batches: re-cutting to a stage's length, document masking, resumable step sampling.

Run: python -m pytest tests/train/test_data.py -q
"""
import numpy as np
import pytest

from dsaforge.data.prepare import load_manifest, read_rows
from dsaforge.data.tokenizer import BOS
from dsaforge.model.train.data import IGNORE, StepSampler, TokenRows, micro_batches, unigram_entropy


def _stream(data_dir, split="train"):
    return read_rows(data_dir, split).combine_chunks().values.to_numpy().astype(np.int64)


def test_rows_recut_the_token_stream_to_the_stage_length(tiny_data):
    stream = _stream(tiny_data)
    for seq_len in (128, 300):                       # the shards' own length, and a longer context
        rows = TokenRows(tiny_data, "train", seq_len)
        assert rows.rows.shape == (len(stream) // (seq_len + 1), seq_len + 1)
        np.testing.assert_array_equal(rows.rows[3], stream[3 * (seq_len + 1):4 * (seq_len + 1)])
        b = rows.batch(np.array([3, 5]))
        assert b.inputs.shape == b.targets.shape == (2, seq_len) and b.segment_ids is None
        assert (b.inputs[:, 1:] == b.targets[:, :-1]).all()


def test_doc_mask_segments_start_at_bos_and_ignore_cross_document_targets(tiny_data):
    bos = load_manifest(tiny_data)["special_tokens"][BOS]
    rows = TokenRows(tiny_data, "train", 512, doc_mask=True)
    b = rows.batch(np.arange(8))
    starts = b.inputs == bos
    assert starts.sum() > 0, "expected several documents per 512-token row"
    # a new segment begins exactly at each BOS (after the first position)
    np.testing.assert_array_equal((b.segment_ids[:, 1:] != b.segment_ids[:, :-1]).numpy(), starts[:, 1:].numpy())
    # the targets whose next token opens a new document (the BOS after an EOS) are not scored
    crossing = b.targets == IGNORE
    assert (crossing[:, :-1] == starts[:, 1:]).all()
    assert (crossing[:, -1] == (rows.rows[:8, -1] == bos)).all()


def test_step_batches_are_a_function_of_the_step_and_cover_epochs():
    s = StepSampler(n_rows=10, batch_size=4, seed=3)
    first = [s.indices(i).tolist() for i in range(5)]
    again = StepSampler(n_rows=10, batch_size=4, seed=3)
    assert [again.indices(i).tolist() for i in (4, 2, 0)] == [first[4], first[2], first[0]]   # any order
    epoch0 = sum(first[:2], []) + first[2][:2]
    assert sorted(epoch0) == list(range(10))                  # every row once per epoch
    assert first[2][2:] + first[3] != epoch0[:6]              # a new permutation for epoch 1
    assert s.epoch(5) == 2.0


def test_data_parallel_ranks_split_the_global_batch():
    whole = StepSampler(100, 8, seed=0)
    parts = [StepSampler(100, 8, seed=0, dp_rank=r, dp_size=4) for r in range(4)]
    for step in (0, 7, 30):
        assert np.concatenate([p.indices(step) for p in parts]).tolist() == whole.indices(step).tolist()
    with pytest.raises(ValueError, match="divisible"):
        StepSampler(100, 6, seed=0, dp_size=4)


def test_micro_batches_and_unigram_entropy(tiny_data):
    rows = TokenRows(tiny_data, "val", 128)
    mbs = micro_batches(rows.batch(np.arange(5)), 2)
    assert [m.inputs.shape[0] for m in mbs] == [2, 2, 1]
    h = unigram_entropy(rows)
    assert 3.0 < h < np.log(rows.vocab_size)
