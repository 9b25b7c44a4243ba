import pytest

from resilient.training.data import ByteTokenizer, DataOrder, tokenize_corpus

pytestmark = pytest.mark.timeout(30)


def test_order_is_deterministic_and_disjoint_per_step():
    a, b = DataOrder(100, 2, 4, seed=7), DataOrder(100, 2, 4, seed=7)
    for step in (1, 2, 30):
        assert a.batch_indices(step, 0) == b.batch_indices(step, 0)
        assert not set(a.batch_indices(step, 0)) & set(a.batch_indices(step, 1))
    assert DataOrder(100, 2, 4, seed=8).batch_indices(1, 0) != a.batch_indices(1, 0)


def test_epochs_cover_every_sample():
    o = DataOrder(10, 1, 5, seed=0)
    assert sorted(o.batch_indices(1, 0) + o.batch_indices(2, 0)) == list(range(10))
    assert sorted(o.batch_indices(3, 0) + o.batch_indices(4, 0)) == list(range(10))


def test_tokenize_text_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("hello world\n\nsecond line\n")
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "hello world"}\n{"text": "second line"}\n')
    x, y = tokenize_corpus(str(t), ByteTokenizer(), 8), tokenize_corpus(str(j), ByteTokenizer(), 8)
    assert x.shape == y.shape == (3, 8)
    with pytest.raises(ValueError, match="fewer than"):
        tokenize_corpus(str(t), ByteTokenizer(), 1000)
