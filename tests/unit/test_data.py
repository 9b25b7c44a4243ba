import pytest

from resilient.config import validate_tree
from resilient.errors import SpecError
from resilient.training.data import ByteTokenizer, DataOrder, share
from resilient.training.prep import prepare
from resilient.training.rows import open_rows

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


def test_text_and_jsonl_give_the_same_chunks(tmp_path):
    """Text without packing: documents (one per non-empty line, or a `text` field) each ended by
    EOS, concatenated and cut into seq_len sequences that carry loss on every token."""
    t = tmp_path / "a.txt"
    t.write_text("hello world\n\nsecond line\n")
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "hello world"}\n{"text": "second line"}\n')
    got = []
    for path in (t, j):
        spec = validate_tree({"name": "t", "data": {"path": str(path), "seq_len": 8}})
        stats = prepare(spec, ByteTokenizer(), str(tmp_path / f"out-{path.suffix}"), str(tmp_path))
        rows = open_rows(str(tmp_path / f"out-{path.suffix}" / "train.arrow"))
        got.append([rows.get("input_ids", i).tolist() for i in range(len(rows))])
        assert stats["mode"] == "chunks" and stats["sequences"] == 3
        assert all((rows.get("labels", i) == rows.get("input_ids", i)).all() for i in range(3))
    eos = ByteTokenizer.eos_token_id
    stream = list(b"hello world") + [eos] + list(b"second line") + [eos]
    assert got[0] == got[1] == [stream[k : k + 8] for k in (0, 8, 16)]
    spec = validate_tree({"name": "t", "data": {"path": str(t), "seq_len": 1000}})
    with pytest.raises(SpecError, match="fewer than data.seq_len"):
        prepare(spec, ByteTokenizer(), str(tmp_path / "x"), str(tmp_path))
