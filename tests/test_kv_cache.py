"""zoo.core.kv_cache: attention over the slot cache computes what a full causal forward computes, for
rows at different lengths, appended prefills and reused rows; row bookkeeping stays on the host."""
import pytest
import torch
import torch.nn.functional as F

from zoo.core.kv_cache import KVCache, Rows, at_ends, attend, bucket_width, padded_ends

HEADS, KV_HEADS, DIM = 4, 2, 8


def qkv(T, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, T, DIM, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, KV_HEADS, T, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def full(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run(cache, rows, new, q, k, v, **kw):
    out = attend(q, k, v, cache.k[0], cache.v[0], cache.rows_for(rows, new, **kw))
    cache.advance(rows, new)
    return out


@pytest.fixture
def cache():
    return KVCache(1, 4, KV_HEADS, 32, DIM, torch.float64, "cpu")


@pytest.mark.parametrize("width", [None, 32])  # exact width, and a graph-style rounded one
def test_batched_decode_of_rows_at_different_lengths_equals_full_causal_attention(cache, width):
    lengths, seqs = [5, 9, 2], [qkv(n + 1, seed) for seed, n in enumerate([5, 9, 2])]
    rows = cache.allocate(3)
    for row, n, (q, k, v) in zip(rows, lengths, seqs):
        torch.testing.assert_close(run(cache, [row], n, q[:, :, :n], k[:, :, :n], v[:, :, :n]),
                                   full(q[:, :, :n], k[:, :, :n], v[:, :, :n]), rtol=0, atol=1e-12)
    # the middle row leaves: a non-contiguous batch, each row at its own position
    cache.release([rows[1]])
    live = [0, 2]
    q, k, v = (torch.cat([seqs[i][j][:, :, -1:] for i in live]) for j in range(3))
    out = run(cache, [rows[i] for i in live], 1, q, k, v, width=width, masked=width is not None)
    for b, i in enumerate(live):
        torch.testing.assert_close(out[b], full(*seqs[i])[0, :, -1:], rtol=0, atol=1e-12)
    assert [cache.lengths[rows[i]] for i in live] == [6, 3]


def test_prefill_appended_to_a_context_equals_one_prefill_of_the_whole(cache):
    q, k, v = qkv(11, seed=3)
    (row,) = cache.allocate()
    run(cache, [row], 4, q[:, :, :4], k[:, :, :4], v[:, :, :4])
    appended = run(cache, [row], 7, q[:, :, 4:], k[:, :, 4:], v[:, :, 4:])
    torch.testing.assert_close(appended, full(q, k, v)[:, :, 4:], rtol=0, atol=1e-12)
    assert cache.room(row) == 32 - 11


def test_a_freed_row_is_reused_empty_and_lowest_first(cache):
    rows = cache.allocate(3)
    q, k, v = qkv(6, seed=1)
    run(cache, [rows[1]], 6, q, k, v)
    cache.release([rows[1]])
    assert cache.free_rows == [1, 3] and cache.allocate() == [1] and cache.lengths[1] == 0
    q, k, v = qkv(3, seed=2)  # a new sequence in the old row sees nothing of the old one
    torch.testing.assert_close(run(cache, [1], 3, q, k, v), full(q, k, v), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="no free"):
        cache.allocate(2)


def test_copied_prefix_then_diverging_rows_equal_their_own_full_forwards(cache):
    q, k, v = qkv(5, seed=4)
    a, b = cache.allocate(2)
    run(cache, [a], 4, q[:, :, :4], k[:, :, :4], v[:, :, :4])
    cache.copy_prefix(a, [b], 4)
    q2, k2, v2 = qkv(1, seed=5)  # row b's own last token
    out = run(cache, [a, b], 1, torch.cat([q[:, :, 4:], q2]), torch.cat([k[:, :, 4:], k2]),
              torch.cat([v[:, :, 4:], v2]))
    torch.testing.assert_close(out[0], full(q, k, v)[0, :, 4:], rtol=0, atol=1e-12)
    other = [torch.cat([t[:, :, :4], t2], dim=2) for t, t2 in ((q, q2), (k, k2), (v, v2))]
    torch.testing.assert_close(out[1], full(*other)[0, :, 4:], rtol=0, atol=1e-12)


def test_context_overflow_is_an_error_and_widths_fall_into_few_buckets(cache):
    (row,) = cache.allocate()
    with pytest.raises(ValueError, match="positions"):
        cache.rows_for([row], 33)
    assert [bucket_width(n, 4096) for n in (1, 256, 257, 600, 5000)] == [256, 256, 512, 1024, 4096]


def test_rows_describe_contiguous_rows_as_a_view_and_skip_masks_nobody_needs():
    fresh = Rows.make([2], [0], 5, "cpu")
    assert fresh.fresh and fresh.mask is None and fresh.view == slice(2, 3)
    same_length = Rows.make([0, 1], [7, 7], 1, "cpu")
    assert same_length.mask is None and same_length.start == 7
    ragged = Rows.make([3, 1], [7, 2], 1, "cpu")
    assert ragged.start is None and isinstance(ragged.view, torch.Tensor)
    assert ragged.mask.shape == (2, 1, 1, 8) and ragged.mask[1, 0, 0].tolist() == [True] * 3 + [False] * 5


def test_a_right_padded_forward_is_read_at_each_rows_own_last_position():
    x = torch.arange(3 * 4 * 2).view(3, 4, 2)  # (rows, positions, features)
    assert padded_ends([4, 4, 4], "cpu") is None and torch.equal(at_ends(x, None), x[:, 3])
    ends = padded_ends([2, 4, 1], "cpu")
    assert torch.equal(at_ends(x, ends), torch.stack([x[0, 1], x[1, 3], x[2, 0]]))
