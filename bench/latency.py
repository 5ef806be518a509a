"""Latency statistics: exact percentiles of the raw samples, and an
HdrHistogram-style correction for coordinated omission.

The correction is HdrHistogram's `recordValueWithExpectedInterval`: a sample
v larger than the expected interval I between requests also records
v - I, v - 2I, ... down to I — the samples a stalled, closed-loop measurement
would have missed. It is computed exactly on a grid of I/16 (the reported
corrected percentiles have that resolution) with stride-I suffix sums, so a
multi-second stall at 5,000/s costs no more than a short one.
"""

import math

PCTS = (50.0, 90.0, 99.0, 99.9)


def _pct_sorted(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1)
    return sorted_vals[k]


def summarize_raw(values_us):
    v = sorted(values_us)
    out = {"count": len(v)}
    for p in PCTS:
        out[f"p{p:g}_ms"] = None if not v else round(_pct_sorted(v, p) / 1000.0, 3)
    out["max_ms"] = None if not v else round(v[-1] / 1000.0, 3)
    out["mean_ms"] = None if not v else round(sum(v) / len(v) / 1000.0, 3)
    return out


def summarize_corrected(values_us, expected_interval_us, max_cells=5_000_000):
    """Percentiles after coordinated-omission correction (see module doc)."""
    if not values_us:
        return {"count": 0}
    k = 16
    grid = expected_interval_us / k
    top = max(values_us)
    while top / grid > max_cells:  # keep memory bounded for absurd stalls
        grid *= 2
        k = max(1, k // 2)
    stride = max(1, round(expected_interval_us / grid))
    n = int(top / grid) + 2
    raw = [0] * n
    diff = [0] * n
    for v in values_us:
        u = int(v / grid)
        raw[u] += 1
        if u - stride >= stride:
            diff[u - stride] += 1
            diff[u % stride] -= 1
    # stride-suffix sums: synth[x] = sum(diff[x + j*stride] for j >= 0)
    synth = diff
    for x in range(n - 1 - stride, -1, -1):
        synth[x] += synth[x + stride]
    total = 0
    counts = raw
    for x in range(n):
        c = raw[x] + synth[x]
        counts[x] = c
        total += c
    out = {"count": total, "grid_us": round(grid, 2)}
    targets = [(p, math.ceil(p / 100.0 * total)) for p in PCTS]
    acc = 0
    ti = 0
    for x in range(n):
        acc += counts[x]
        while ti < len(targets) and acc >= targets[ti][1]:
            p = targets[ti][0]
            out[f"p{p:g}_ms"] = round(min((x + 1) * grid, top) / 1000.0, 3)  # cell's upper edge
            ti += 1
        if ti == len(targets):
            break
    out["max_ms"] = round(top / 1000.0, 3)
    return out
