"""Which features (records) or time segments (waveform windows) drive an anomaly score.

Method: counterfactual replacement ("what would the NLL be if this part looked normal?").

* Records: for feature k, the record is re-scored with ``x_k`` replaced by each of ``M`` reference
  values (quantiles of that feature on held-out normal records, stored with the calibration). The
  attribution is ``a_k = NLL(x) − min_m NLL(x with x_k = r_km)`` in nats, floored at 0: how much
  of the score disappears when feature k alone is made typical.
* Feature groups (declared in the schema, ``DataSpec.feature_groups``; for vitals the blood
  pressures and the Glasgow coma scale): coupled features are replaced together, by ``M`` joint
  reference tuples (the group's values in normal records at the quantiles of its first principal
  component, so each tuple is a combination that occurs). Replacing one blood pressure of a
  hypotensive record leaves the other two low and inconsistent with it, so no single feature
  explains hypotension; the group does. A group is ranked above its members only when it
  explains :data:`GROUP_GAIN` × more than its best member; otherwise the member, the more specific
  answer, comes first (a unit error in one pressure is that pressure's).
* Records with absent features: only the observed ones (and groups, restricted to their observed
  members) are attributed; a variant is scored with the same marginal estimator as the record.
* Waveforms: the window is cut into ``S`` equal segments. Segment j is replaced by the same
  samples one beat period earlier (or later, at the window's start), the period estimated from the
  PLETH autocorrelation between 0.33 and 1.5 s; ``a_j = NLL(x) − NLL(x with segment j replaced)``.
  A flat line, a motion burst or an ectopic beat is replaced by the neighbouring normal beat.

The same differences apply to any statistic of the NLL: with ``typicality`` (``|NLL − mean|``) an
attribution is how much of the distance from the typical score disappears, so a flat line that
makes a window *too* likely is explained too. The functions below take whichever score they are
given (the route passes the request's statistic).

Every variant of a record is scored with that record's dequantization noise, so differences come
from the replaced values only. The variants are plain rows for any scorer (the service sends them
through its batcher).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..artifacts.manifest import Calibration
from ..data.mimic_schema import SAMPLE_RATE_HZ

ReferenceValues = np.ndarray  # (D, M)
GROUP_GAIN = 1.5


def group_reference(normal: np.ndarray, features: list[int], m: int = 9) -> np.ndarray:
    """``(M, g)`` joint reference tuples of a feature group: normal records at the quantiles ``(i + 0.5)/m``
    of the group's first principal component (standardised features)."""
    v = np.asarray(normal, dtype=np.float64)[:, features]
    z = (v - v.mean(0)) / np.maximum(v.std(0), 1e-12)
    pc = np.linalg.svd(z, full_matrices=False)[2][0]
    t = z @ pc
    order = np.argsort(t, kind="stable")
    picks = order[np.clip(((np.arange(m) + 0.5) / m * len(t)).astype(int), 0, len(t) - 1)]
    return v[picks]


def part_variants(x: np.ndarray, parts: list[tuple[list[int], np.ndarray]]) -> np.ndarray:
    """``(B, D)`` and parts ``(features, reference)`` → ``(B·P·M, D)``: row ``(b, p, m)`` is record b with part p's
    features set to its m-th reference tuple. A reference is ``(M, g)`` (shared) or ``(B, M, g)`` (per record)."""
    b, d = x.shape
    m = parts[0][1].shape[-2]
    v = np.repeat(np.asarray(x, dtype=np.float64)[:, None, None, :], len(parts), 1).repeat(m, 2)  # (B, P, M, D)
    for p, (features, ref) in enumerate(parts):
        ref = np.broadcast_to(np.asarray(ref, dtype=np.float64), (b, m, len(features)))
        v[:, p, :, features] = ref.transpose(2, 0, 1)
    return v.reshape(b * len(parts) * m, d).astype(np.float32)


def conditional_reference(mean: np.ndarray, cov: np.ndarray, x: np.ndarray, features: list[int], given: list[int],
                          discrete: list[int] | None = None) -> np.ndarray:
    """``(B, g)``: the Gaussian conditional expectation ``E[x_G | x_R]`` of a part's features given the record's other
    observed features ``given`` (mean and covariance of the dequantized training records, :mod:`models.anomaly.marginal`);
    discrete features are rounded back to their levels. The value the part would typically take in *this* record."""
    x = np.asarray(x, dtype=np.float64)
    g, r = list(features), [j for j in given if j not in set(features)]
    shift = np.zeros(x.shape[1])
    if discrete:
        shift[discrete] = 0.5
    if r:
        coef = np.linalg.solve(cov[np.ix_(r, r)], cov[np.ix_(r, g)])  # (r, g)
        out = mean[g] + (x[:, r] + shift[r] - mean[r]) @ coef
    else:
        out = np.broadcast_to(mean[g], (len(x), len(g))).copy()
    out = out - shift[g]
    disc = [i for i, j in enumerate(g) if discrete and j in discrete]
    out[:, disc] = np.round(out[:, disc])
    return out


def part_attribution(score: np.ndarray, variant_score: np.ndarray, parts: int, m: int) -> np.ndarray:  # noqa: D417
    """``(B,)`` scores and ``(B·P·M,)`` variant scores → ``(B, P)`` attributions in nats (≥ 0)."""
    best = np.asarray(variant_score, dtype=np.float64).reshape(-1, parts, m).min(2)
    return np.maximum(np.asarray(score, dtype=np.float64)[:, None] - best, 0.0)


def rank_parts(a: np.ndarray, members: list[list[int] | None]) -> np.ndarray:
    """Order of parts for one record's attributions ``a (P,)``: by nats, except that a group (``members[p]``,
    the part indices of its features) goes just after its best member unless it explains
    :data:`GROUP_GAIN` × more."""
    key = np.array(a, dtype=np.float64)
    for p, mem in enumerate(members):
        if mem:
            best = max(a[q] for q in mem)
            if a[p] < GROUP_GAIN * best:
                key[p] = best - 1e-9
    return np.lexsort((np.arange(len(a)), -key))


def reference_values(normal: np.ndarray, m: int = 9, discrete: list[int] | None = None) -> ReferenceValues:
    """``(D, M)`` reference values per feature: the ``m`` quantiles ``(i + 0.5)/m`` of normal records ``(N, D)``."""
    q = (np.arange(m) + 0.5) / m
    ref = np.quantile(np.asarray(normal, dtype=np.float64), q, axis=0).T
    if discrete:
        ref[discrete] = np.quantile(np.asarray(normal, dtype=np.float64)[:, discrete], q, axis=0, method="nearest").T
    return ref


def feature_variants(x: np.ndarray, reference: ReferenceValues) -> np.ndarray:
    """``(B, D)`` → ``(B·D·M, D)``: row ``(b, k, m)`` is record b with feature k set to ``reference[k, m]``."""
    b, d = x.shape
    m = reference.shape[1]
    v = np.repeat(x[:, None, None, :], d, 1).repeat(m, 2).astype(np.float64)  # (B, D, M, D)
    k = np.arange(d)
    v[:, k, :, k] = reference[None, :, :].transpose(1, 0, 2)  # diagonal: feature k of variant (k, m)
    return v.reshape(b * d * m, d).astype(np.float32)


def feature_attribution(nll: np.ndarray, variant_nll: np.ndarray, d: int, m: int) -> np.ndarray:
    """``(B,)`` scores and ``(B·D·M,)`` variant scores → ``(B, D)`` attributions in nats (≥ 0)."""
    best = np.asarray(variant_nll, dtype=np.float64).reshape(-1, d, m).min(2)
    return np.maximum(np.asarray(nll, dtype=np.float64)[:, None] - best, 0.0)


def beat_period(window: np.ndarray, channel: int = 0) -> int:
    """Dominant period (samples) of one ``(C, T)`` window from its autocorrelation, 0.33–1.5 s."""
    s = window[channel] - window[channel].mean()
    ac = np.correlate(s, s, mode="full")[len(s) - 1 :]
    lo, hi = int(0.33 * SAMPLE_RATE_HZ), min(int(1.5 * SAMPLE_RATE_HZ), len(s) // 2)
    return lo + int(np.argmax(ac[lo:hi])) if hi > lo else lo


def segment_bounds(t: int, segments: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, t, segments + 1).round().astype(int).tolist()
    return list(zip(edges[:-1], edges[1:]))


def segment_variants(x: np.ndarray, segments: int = 16) -> np.ndarray:
    """``(B, C, T)`` → ``(B·S, C, T)``: segment j replaced by the signal one beat period away."""
    b, c, t = x.shape
    out = np.repeat(x[:, None], segments, 1).copy()
    for i in range(b):
        p = beat_period(x[i])
        for j, (s, e) in enumerate(segment_bounds(t, segments)):
            shift = -p if s - p >= 0 else p
            while s + shift < 0 or e + shift > t:  # windows shorter than a period away on both sides
                shift = shift // 2 if abs(shift) > 1 else 0
                if shift == 0:
                    break
            out[i, j, :, s:e] = x[i, :, s + shift : e + shift]
    return out.reshape(b * segments, c, t)


def segment_attribution(nll: np.ndarray, variant_nll: np.ndarray, segments: int) -> np.ndarray:
    """``(B,)`` and ``(B·S,)`` → ``(B, S)`` NLL drops in nats (≥ 0)."""
    return np.maximum(np.asarray(nll, dtype=np.float64)[:, None] - np.asarray(variant_nll, dtype=np.float64).reshape(-1, segments), 0.0)


def attribute(score: Callable[[np.ndarray, np.ndarray], np.ndarray], x: np.ndarray, noise: np.ndarray | None,
              reference: ReferenceValues | None = None, segments: int = 16) -> np.ndarray:
    """Attributions for ``x`` with ``score(rows, noise_rows) -> NLL (nats)``: ``(B, D)`` for records, ``(B, S)`` for windows."""
    nll = score(x, noise)
    if x.ndim == 2:
        if reference is None:
            raise ValueError("record attribution needs reference values (stored with the calibration)")
        d, m = reference.shape
        rows = feature_variants(x, reference)
        per = d * m
    else:
        rows = segment_variants(x, segments)
        per = segments
    rows_noise = None if noise is None else np.repeat(noise, per, axis=0)
    v = score(rows, rows_noise)
    return feature_attribution(nll, v, d, m) if x.ndim == 2 else segment_attribution(nll, v, segments)


def record_parts(spec, calibration: Calibration, observed: np.ndarray | None = None,  # noqa: ANN001 - DataSpec
                 x: np.ndarray | None = None) -> tuple[list[tuple[list[int], np.ndarray]], list[dict], list[list[int] | None]]:
    """The parts attributed for records ``x (B, D)`` of one pattern (``observed`` feature indices; all when ``None``).

    Returns ``parts`` for :func:`part_variants`, a label per part (``{"feature": name}`` or
    ``{"group": name, "features": [...]}``), and per part the indices of its member parts
    (groups) or ``None`` (features). Groups keep their observed members and need two of them.
    The references of a part are the ``M`` stored ones plus, with ``x`` and a calibration that
    holds the proposal's Gaussian fit, its :func:`conditional_reference` given the rest of the
    record: a high heart rate that a low blood pressure explains (compensation) is then no
    longer blamed, and the pressures are, because replacing them by what this record's heart
    rate makes typical removes the surprise.
    """
    names = spec.feature_names or [str(k) for k in range(spec.dims)]
    seen = list(range(spec.dims)) if observed is None else [int(j) for j in observed]
    ref = np.asarray(calibration.reference, dtype=np.float64)  # (D, M)
    specs: list[tuple[list[int], np.ndarray]] = [([j], ref[j][:, None]) for j in seen]
    labels: list[dict] = [{"feature": names[j]} for j in seen]
    members: list[list[int] | None] = [None] * len(seen)
    for group, tuples in (calibration.group_reference or {}).items():
        feats = [names.index(f) for f in (spec.feature_groups or {}).get(group, [])]
        keep = [i for i, j in enumerate(feats) if j in seen]
        if len(keep) < 2 or len(feats) != np.asarray(tuples).shape[1]:
            continue
        specs.append(([feats[i] for i in keep], np.asarray(tuples, dtype=np.float64)[:, keep]))
        labels.append({"group": group, "features": [names[feats[i]] for i in keep]})
        members.append([seen.index(feats[i]) for i in keep])
    fit = calibration.proposal
    if x is None or fit is None:
        return specs, labels, members
    mean, cov = np.asarray(fit["mean"], dtype=np.float64), np.asarray(fit["cov"], dtype=np.float64)
    parts = []
    for features, shared in specs:
        cond = conditional_reference(mean, cov, x, features, seen, spec.discrete_features)  # (B, g)
        parts.append((features, np.concatenate([np.broadcast_to(shared, (len(x), *shared.shape)), cond[:, None, :]], 1)))
    return parts, labels, members


def describe_parts(a: np.ndarray, labels: list[dict], members: list[list[int] | None], top: int) -> list[list[dict]]:
    """``(B, P)`` part attributions → per record the ``top`` parts in :func:`rank_parts` order, as ``{**label, "nats"}``."""
    return [[{**labels[p], "nats": float(row[p])} for p in rank_parts(row, members)[:top]] for row in np.asarray(a)]
