import pytest

from resilient.training.data import ByteTokenizer, DataOrder, share, tokenize_corpus

pytestmark = pytest.mark.timeout(30)


def test_order_is_deterministic_and_disjoint_per_step():
    a, b = DataOrder(100, 8, 4, seed=7), DataOrder(100, 8, 4, seed=7)
    for step in (1, 2, 30):
        assert a.microbatch(step, 0) == b.microbatch(step, 0)
        assert not set(a.microbatch(step, 0)) & set(a.microbatch(step, 1))
    assert DataOrder(100, 8, 4, seed=8).microbatch(1, 0) != a.microbatch(1, 0)


def test_epochs_cover_every_sample():
    o = DataOrder(10, 5, 5, seed=0)
    assert sorted(o.microbatch(1, 0) + o.microbatch(2, 0)) == list(range(10))
    assert sorted(o.microbatch(3, 0) + o.microbatch(4, 0)) == list(range(10))


def test_a_step_is_the_same_samples_at_every_world_size():
    """The step's samples depend on the step alone; the ranks present share its microbatches."""
    o = DataOrder(1000, 12, 2, seed=3)
    assert o.count == 6
    for world in (1, 2, 3, 4, 5, 6):
        shares = [share(o.count, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(6))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert share(6, 1, 4) == [1, 5]


def test_tokenize_text_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("hello world\n\nsecond line\n")
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "hello world"}\n{"text": "second line"}\n')
    x, y = tokenize_corpus(str(t), ByteTokenizer(), 8), tokenize_corpus(str(j), ByteTokenizer(), 8)
    assert x.shape == y.shape == (3, 8)
    with pytest.raises(ValueError, match="fewer than"):
        tokenize_corpus(str(t), ByteTokenizer(), 1000)
