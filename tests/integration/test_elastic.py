"""Elastic recovery on a real Ray cluster: a killed rank is replaced while the surviving rank keeps
its process (and the adapter stays bit-equal to an uninterrupted run); `resilient scale` shrinks
the job at the next step and grows it back, with the same global batch (float tolerance of the
uninterrupted run)."""

import pytest

from tests.helpers import (
    adapter,
    assert_same_adapter,
    await_journal,
    background_launch,
    read_journal,
    resilient_cli,
    status,
    write_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ELASTIC = "\n".join(["", "[cluster]", "num_workers = 2", "min_workers = 1", ""])


def _spec(work, name: str, steps: int, extra: str = ""):
    path = write_job(work, name=name, steps=steps)
    text = path.read_text().replace("[cluster]\nnum_workers = 2\n", ELASTIC.lstrip("\n"))
    path.write_text(text.replace("every = 5", "every = 2") + extra)
    return str(path)


def test_survivor_kept_bit_equal(tmp_path):
    steps = 40
    r = resilient_cli("launch", _spec(tmp_path, "e", steps), "--run-id", "clean")
    assert r.returncode == 0, r.stdout
    kill = '\n[[chaos]]\nat_step = 25\nfault = "kill"\nrank = 1\n'
    r = resilient_cli("launch", _spec(tmp_path, "e", steps, kill), "--run-id", "kill")
    assert r.returncode == 0, r.stdout
    run = tmp_path / "runs" / "e" / "kill"
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1 and s["world_size"] == 2
    r0, r1 = s["ranks"]
    assert (r0["restarts"], r1["restarts"]) == (0, 1), s["ranks"]
    (kept,) = [x for x in read_journal(run) if x["type"] == "survivors"]
    assert kept["kept"] == [0] and kept["replaced"] == [1]
    assert_same_adapter(adapter(tmp_path / "runs" / "e" / "clean"), adapter(run))


def test_scale_shrinks_and_grows_back_with_the_same_global_batch(tmp_path):
    import torch

    steps = 1200
    r = resilient_cli("launch", _spec(tmp_path, "g", steps), "--run-id", "clean", timeout=300)
    assert r.returncode == 0, r.stdout
    run = tmp_path / "runs" / "g" / "scaled"
    with background_launch(_spec(tmp_path, "g", steps), "--run-id", "scaled") as proc:
        await_journal(run, lambda j: '"to": "RUNNING"' in j)
        out = resilient_cli("scale", str(run), "--workers", "1")
        assert out.returncode == 0, out.stdout
        await_journal(run, lambda j: '"to": 1' in j and '"type": "ranks"' in j.split('"to": 1')[1])
        out = resilient_cli("scale", str(run), "--workers", "2")
        assert out.returncode == 0, out.stdout
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 0 and s["world_size"] == 2
    assert [(x["from"], x["to"]) for x in s["resizes"]] == [(2, 1), (1, 2)], s["resizes"]
    assert s["resizes"][0]["step"] < s["resizes"][1]["step"] < steps
    a, b = adapter(tmp_path / "runs" / "g" / "clean"), adapter(run)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a), worst


def test_scale_refuses_sizes_outside_min_and_num_workers(tmp_path):
    r = resilient_cli("launch", _spec(tmp_path, "s", 4), "--run-id", "done")
    assert r.returncode == 0, r.stdout
    run = str(tmp_path / "runs" / "s" / "done")
    out = resilient_cli("scale", run, "--workers", "3")
    assert out.returncode == 2 and "1..2" in out.stdout and "Traceback" not in out.stdout
    out = resilient_cli("scale", run, "--workers", "1")
    assert out.returncode == 2 and "already ended SUCCEEDED" in out.stdout
