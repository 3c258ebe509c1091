"""The memory-lean elementwise steps (``merging.elementwise``) on parameters large enough to take every code path:
chunked merges across chunk boundaries, the sampled threshold (and its exact fallback), the chunked DARE draw.

The small-shape float64 contract of every method is in ``test_functional_reference.py``; these parameters have more
than ``4 · SAMPLE`` entries, so the thresholds come from the sample-and-bracket route the small ones never take.
"""

from __future__ import annotations

import pytest
import torch

from drm_lightning.merging import functional as F
from drm_lightning.merging import reference as ref
from drm_lightning.merging.ops import elementwise as E

N = 4 * E.SAMPLE + 12_345  # above the direct-topk size, and not a multiple of the chunk size


def _sorted_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.abs().flatten().sort(descending=True).values[k - 1]


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g)
    mostly_zero = torch.where(torch.rand(N, generator=g) < 0.9, 0.0, x)
    periodic = 1e-3 * torch.randn(N, generator=g)  # every sampled entry huge: the bracket misses, the fallback runs
    periodic[:: N // E.SAMPLE] = 1e3
    return {
        "random": x,
        "float64": x.double() * 1e-3,
        "bfloat16": x.bfloat16(),
        "mostly_zero": mostly_zero,
        "periodic": periodic,
        "ties": torch.randint(-3, 4, (N,), generator=g).float(),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("fraction", [1 / N, 0.01, 0.2, 0.5, 0.9, 1.0])
def test_kth_largest_abs_is_exact(case: str, fraction: float) -> None:
    x = _cases()[case]
    k = max(1, round(fraction * N))
    got = E.kth_largest_abs(x, k)
    assert got.dtype == x.dtype and torch.equal(got, _sorted_kth(x, k))


def test_kth_largest_abs_with_mask() -> None:
    g = torch.Generator().manual_seed(1)
    x, keep = torch.randn(N, generator=g), torch.rand(N, generator=g) > 0.7
    for k in (1, 1000, N // 5, N):
        assert torch.equal(E.kth_largest_abs(x, k, keep), _sorted_kth(torch.where(keep, x, 0.0), k))
    with pytest.raises(ValueError, match="k=0"):
        E.kth_largest_abs(x, 0)


@pytest.mark.parametrize("per_row", [False, True])
def test_keep_top_in_place(per_row: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, N // 3, generator=g, dtype=torch.float64)
    expected = torch.stack([ref.keep_top_fraction(row, 0.2) for row in x]) if per_row else ref.keep_top_fraction(x, 0.2)
    out = E.keep_top_(x, 0.2, per_row=per_row)
    assert out is x and torch.equal(x, expected)
    with pytest.raises(ValueError, match="contiguous"):
        E.keep_top_(torch.randn(8, 4).mT, 0.5)


def test_dare_mask_equals_one_draw_on_cpu() -> None:
    """Drawn in chunks, the CPU mask is the one ``torch.rand([T, *shape])`` draw the contract names."""
    shape, tasks, p = (257, 1031), 3, 0.7
    generator = torch.Generator().manual_seed(5)
    expected = torch.rand((tasks, *shape), generator=generator, dtype=torch.float32) >= p
    assert torch.equal(E.dare_keep_mask(shape, tasks, p, 5, torch.device("cpu")), expected.reshape(tasks, -1))


def _deltas(shape: tuple[int, ...], tasks: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(shape, generator=g)
    return [0.5 * shared + torch.randn(shape, generator=g) for _ in range(tasks)]


LARGE = (643, 419)  # 269,417 entries: several chunks and the sampled thresholds
COEFFS = [1.0, 0.5, 2.0, 0.75]


@pytest.mark.parametrize(
    ("name", "run", "expected"),
    [
        ("task_arithmetic", lambda d: F.task_arithmetic(d, COEFFS), lambda d: ref.task_arithmetic(d, COEFFS)),
        ("ties", lambda d: F.ties(d, 0.2, COEFFS), lambda d: ref.ties(d, 0.2, COEFFS)),
        (
            "elect",
            lambda d: F.elect_and_merge(d, COEFFS),
            lambda d: ref.elect_and_merge([x.double() for x in d], COEFFS),
        ),
        ("dare", lambda d: F.dare(d, 0.9, 7, coefficients=COEFFS), lambda d: ref.dare(d, 0.9, 7, coefficients=COEFFS)),
        (
            "dare_ties",
            lambda d: F.dare(d, 0.5, 7, "ties", COEFFS, 0.3),
            lambda d: ref.dare(d, 0.5, 7, "ties", COEFFS, 0.3),
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_elementwise_methods_match_float64_reference(name: str, run, expected, dtype: torch.dtype) -> None:
    deltas = [d.to(dtype) for d in _deltas(LARGE)]
    out = run(deltas)
    assert out.dtype == dtype and out.shape == LARGE
    # the float64 result rounded once to the output dtype is the only difference allowed
    assert ref.relative_error(out.double(), expected(deltas)) <= (1e-7 if dtype == torch.float32 else 4e-3)


def test_inputs_are_left_alone_and_views_work() -> None:
    deltas = _deltas((300, 301))
    views = [d.mT for d in deltas]  # non-contiguous inputs
    before = [v.clone() for v in views]
    for fn in (F.ties, F.dare, F.task_arithmetic, F.elect_and_merge):
        fn(views)
    assert all(torch.equal(a, b) for a, b in zip(views, before, strict=True))
    torch.testing.assert_close(F.ties(views), F.ties([v.contiguous() for v in views]), rtol=0, atol=0)


@pytest.mark.parametrize(("case", "full"), [("random", False), ("periodic", True)])
def test_threshold_route(case: str, full: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample that represents the data brackets the threshold (a ~1 % band is sorted); one that does not (every
    sampled entry an outlier) falls back to the full ``topk``, and both are exact."""
    sizes: list[int] = []
    kth_of = E._kth_of
    monkeypatch.setattr(E, "_kth_of", lambda values, k: (sizes.append(values.numel()), kth_of(values, k))[1])
    x, k = _cases()[case], N // 2
    assert torch.equal(E.kth_largest_abs(x, k), _sorted_kth(x, k))
    assert sizes == [N] if full else (len(sizes) == 1 and sizes[0] < N // 50)


def _chunked(values: torch.Tensor, step: int = 10_007):
    """``kth_largest_many``'s input: the values chunk by chunk (a fresh iterator per pass), and its strided sample."""
    flat = values.abs().flatten()
    return (lambda: iter(flat.split(step))), flat[:: max(1, flat.numel() // E.SAMPLE)]


@pytest.mark.parametrize("case", list(_cases()))
def test_kth_largest_many_is_exact_for_every_k(case: str) -> None:
    """Several thresholds of the same values from one sample and one pass (DRM's drop-rate sweep), each exact."""
    x = _cases()[case]
    chunks, sample = _chunked(x)
    ks = [1, 37, N // 10, N // 5, N // 2, N // 2 + 1, N - 1, N]
    got = E.kth_largest_many(chunks, N, sample, ks)
    assert sorted(got) == sorted(ks)
    for k in ks:
        assert torch.equal(got[k], _sorted_kth(x, k)), k
    small = x[:1000]
    chunks, sample = _chunked(small, 77)
    assert all(
        torch.equal(v, _sorted_kth(small, k)) for k, v in E.kth_largest_many(chunks, 1000, sample, [3, 500]).items()
    )
    with pytest.raises(ValueError, match="outside"):
        E.kth_largest_many(chunks, 1000, sample, [0])


@pytest.mark.parametrize("route", ["one pass", "second pass", "bracket missed"])
def test_kth_largest_many_routes(route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The band buffer sized from the sample: filled in the counting pass; too small (a sample that underestimates the
    band) gathered again in a second pass; a bracket that misses falls back to all values. Every route is exact."""
    passes = 0
    x = _cases()["periodic" if route == "bracket missed" else "random"]
    chunks, sample = _chunked(x)

    def counted():
        nonlocal passes
        passes += 1
        return chunks()

    if route == "second pass":
        real_empty, calls = torch.Tensor.new_empty, []

        def first_one_small(self: torch.Tensor, size: int) -> torch.Tensor:  # the first-pass buffer: 8 entries
            calls.append(size)
            return real_empty(self, min(size, 8) if len(calls) == 1 else size)

        monkeypatch.setattr(torch.Tensor, "new_empty", first_one_small)
    k = N // 3
    assert torch.equal(E.kth_largest_many(counted, N, sample, [k])[k], _sorted_kth(x, k))
    assert passes == {"one pass": 1, "second pass": 2, "bracket missed": 2}[route]
