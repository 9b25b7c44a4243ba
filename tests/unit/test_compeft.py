"""ComPEFT packing: top-k of the update by magnitude, signs and one scale per tensor, in one
uint8 tensor; expansion restores names, shapes and dtypes exactly and the values approximately."""

import pytest
import torch

from resilient.training import compeft

pytestmark = pytest.mark.timeout(60)


def _adapter(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.lora_A.weight": (16, 512), "a.lora_B.weight": (512, 16), "b.vec": (37,)}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _cos(a, b):
    flat = lambda t: torch.cat([t[k].flatten().float() for k in sorted(t)])  # noqa: E731
    return torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0).item()


def test_round_trip_keeps_names_shapes_dtypes_and_direction():
    init = _adapter(0)
    dense = {k: v + 0.1 * _adapter(1)[k] for k, v in init.items()}
    packed = compeft.compress(dense, init, 0.1)
    assert set(packed) == {"bits", "scales"} and packed["bits"].dtype == torch.uint8
    out = compeft.expand(packed, init)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: (v.shape, v.dtype) for k, v in dense.items()
    }
    delta = {k: dense[k] - init[k] for k in init}
    got = {k: out[k] - init[k] for k in init}
    for k in init:  # exactly the top 10% of each tensor's update, with its signs
        n = delta[k].numel()
        kept = got[k] != 0
        assert kept.sum() == -(-n // 10)
        assert torch.equal(torch.sign(got[k][kept]), torch.sign(delta[k][kept]))
        assert delta[k].abs()[kept].min() >= delta[k].abs()[~kept].max()
    assert _cos(delta, got) > 0.6  # a Gaussian's top decile with signs: ~0.65
    dense_bytes = sum(v.numel() * 4 for v in dense.values())
    assert dense_bytes / (packed["bits"].numel() + 4 * packed["scales"].numel()) > 25


def test_constant_magnitude_update_is_exact_at_full_density():
    # Quarters: exactly representable in bfloat16, so the update's magnitude is exactly 0.5.
    init = {k: (v * 4).round().div(4).to(torch.bfloat16) for k, v in _adapter(0).items()}
    dense = {
        k: (v.float() + 0.5 * torch.sign(_adapter(2)[k])).to(torch.bfloat16)
        for k, v in init.items()
    }
    out = compeft.expand(compeft.compress(dense, init, 1.0), init)
    assert all(torch.equal(out[k], dense[k]) for k in dense)


def test_unchanged_tensor_and_wrong_init_are_handled():
    init = _adapter(0)
    dense = dict(init, **{"b.vec": init["b.vec"] + 1})
    out = compeft.expand(compeft.compress(dense, init, 0.5), init)
    assert torch.equal(out["a.lora_A.weight"], init["a.lora_A.weight"])  # no update, no change
    with pytest.raises(ValueError, match="packed tensors"):
        compeft.expand(compeft.compress(dense, init, 0.5), {"b.vec": init["b.vec"]})
    packed = compeft.compress(dense, init, 0.5)
    for bad in (packed["bits"][:-3], torch.cat([packed["bits"], packed["bits"][:2]])):
        with pytest.raises(ValueError, match="packed bits"):
            compeft.expand({"bits": bad, "scales": packed["scales"]}, init)
    empty = {"e": torch.zeros(0)}
    assert compeft.expand(compeft.compress(empty, empty, 0.1), empty)["e"].shape == (0,)
    assert compeft.digest(init) == compeft.digest(dict(init))
    assert compeft.digest(init) != compeft.digest(dense)
