"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np

from dsv3_export.engines.runtime import prefix_in_buffer

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is scripts, not a package)."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_max_err(a, b) -> float:
    """max |a - b| / max |a| (torch tensors or numpy arrays): the figure every parity test states its
    tolerance in."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / np.abs(a).max())
    return ((a - b).abs().max() / a.abs().max()).item()


def assert_clean_error(result, *needles, one_line: bool = True, code: int = 1):
    """A CLI result that failed as users should see it: exit 1 (2 for a flag's value Click refuses,
    its usage-error code), an `error:` line naming the culprit, no traceback (progress output may
    precede it where one_line is False)."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error: "), result.output
    if one_line:
        assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[-1], lines[-1]


# ---- statistics ------------------------------------------------------------------------------------
def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    a, z = df / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    if z < a + 1:  # series for the lower P
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= z / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # continued fraction for Q (Lentz)
    tiny = 1e-300
    b = z + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - math.lgamma(a)) * h


def chi_square(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Goodness of fit of observed counts to probabilities; cells with small expectation merged.
    Returns (statistic, degrees of freedom, p-value). Observations in a zero-probability cell fail."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    assert counts[probs == 0].sum() == 0, "draws where the distribution has no mass"
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    obs, exp = np.array(obs), np.array(exp)
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return stat, df, chi2_sf(stat, df)


# ---- the graph contract -------------------------------------------------------------------------------
def buffered_feed(input_ids: np.ndarray, pasts: dict, **inputs) -> dict:
    """A graph-contract v2 feed for a call in prefix form: each cache prefix [B,T,...] (by input name)
    copied into a zeroed buffer with room for the S new tokens, cache_lengths T. The graph's presents
    are then the prefixes grown by S rows, as in the prefix form."""
    buffers = {name: prefix_in_buffer(p, input_ids.shape[1]) for name, p in pasts.items()}
    lengths = next(iter(buffers.values()))[1]
    return {"input_ids": input_ids, "cache_lengths": lengths, **inputs, **{n: b for n, (b, _) in buffers.items()}}


def layer_pasts(past) -> dict:
    """{past_latent.i: array} of a list of per-layer caches (numpy or torch)."""
    return {f"past_latent.{i}": np.asarray(p) for i, p in enumerate(past)}


def run_together(fn, n: int, timeout: float = 120.0) -> list:
    """fn(0) .. fn(n-1) in n threads released at once (a barrier: the requests overlap), each joined
    within `timeout`; their results in order. An exception in any is raised here, listed."""
    import threading

    results: dict[int, object] = {}
    errors: list[str] = []
    barrier = threading.Barrier(n)

    def one(i):
        try:
            barrier.wait(30)
            results[i] = fn(i)
        except Exception as e:  # reported below, from the test's thread
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    return [results.get(i) for i in range(n)]


def closed_within(sock, seconds: float) -> bytes:
    """What a server sent on `sock` before closing the connection; fails when it is still open
    after `seconds` (a bounded loop: every recv waits at most what is left)."""
    got, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the connection is still open after {seconds} s (got {got[:200]!r})")
