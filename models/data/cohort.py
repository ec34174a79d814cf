"""A synthetic MIMIC-style cohort: hourly vitals and PLETH/ABP waveform windows, with labelled anomalies.

**Synthetic, never patient data.** The generator is deterministic by seed and produces records of
the same shape and units as MIMIC-III exports, so that everything downstream runs without
credentialed data.

Vitals (one record per patient-hour, the 17 benchmark variables):

* per-patient latent severity ``s ~ Beta(2, 5)`` and baselines drawn around it, with the
  physiological couplings: ``MAP ≈ DBP + (SBP − DBP)/3``, DBP tied to SBP, heart and respiratory
  rate rising with severity, SpO2 falling and FiO2 rising with it, GCS components summing to the
  total, weight from height through a BMI draw;
* hourly AR(1) deviations (shared innovation across the blood pressures) and a 24-hour circadian
  term on heart rate, blood pressure and temperature;
* missingness per variable at MIMIC-like rates (heart rate almost hourly, pH and capillary refill
  rarely, height and weight mostly at admission).

Waveforms (125 Hz, 1024-sample windows): beat-to-beat intervals with heart-rate variability and
respiratory sinus arrhythmia; PLETH pulses with a systolic peak, dicrotic notch and diastolic
wave, respiratory baseline and amplitude modulation, delayed by the pulse transit time; ABP in
mmHg between the patient's diastolic and systolic pressures with its own notch; sensor noise.

Anomaly kinds. Vitals: ``hypotension`` (SBP/DBP/MAP fall, heart rate compensates),
``unit_error`` (one variable in the wrong unit: °F, lb, mmol/L, inches or FiO2 in percent),
``implausible`` (one variable set outside physiology). Waveforms: ``ectopic`` (premature beats
with a compensatory pause), ``flatline`` (sensor off: both channels flat for 2–4 s), ``motion``
(PLETH artefact burst), ``damped_abp`` (low-passed ABP with half the pulse pressure). Each
anomaly records the feature (vitals) or the time segment (waveforms) it was planted in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mimic_schema import INDEX, SAMPLE_RATE_HZ, VITAL_NAMES, VITALS, WINDOW

NORMAL = "normal"

# Observation probability per patient-hour (columns of VITALS).
_OBSERVED = np.array([0.05, 0.9, 0.15, 0.2, 0.2, 0.2, 0.2, 0.15, 0.97, 0.0, 0.9, 0.9, 0.9, 0.9, 0.25, 0.02, 0.08])


@dataclass(frozen=True)
class VitalsCohort:
    """``values (N, 17)`` with NaN where unobserved; ``patient``, ``hour`` ``(N,)``; labels ``kind`` and ``feature`` (−1: none)."""

    values: np.ndarray
    patient: np.ndarray
    hour: np.ndarray
    kind: np.ndarray
    feature: np.ndarray


@dataclass(frozen=True)
class WaveformCohort:
    """``windows (N, 2, 1024)`` (PLETH, ABP in mmHg); ``patient``; labels ``kind`` and ``segment (N, 2)`` in samples ([-1, -1]: none)."""

    windows: np.ndarray
    patient: np.ndarray
    kind: np.ndarray
    segment: np.ndarray


def _patients(n: int, rng: np.random.Generator, severity_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Per-patient baselines, each ``(n,)``; ``severity_scale`` multiplies every patient's severity (in [0, 1])."""
    s = np.clip(rng.beta(2, 5, n) * severity_scale, 0, 1)
    sbp = 122 - 10 * s + 14 * rng.standard_normal(n)
    dbp = 0.45 * sbp + 8 + 6 * rng.standard_normal(n)
    height = 170 + 9 * rng.standard_normal(n)
    gcs_drop = rng.binomial(1, np.clip(1.6 * s - 0.2, 0, 1))  # sedated / impaired patients
    return {
        "severity": s, "sbp": sbp, "dbp": dbp,
        "hr": 78 + 25 * s + 9 * rng.standard_normal(n),
        "rr": 15 + 8 * s + 2.5 * rng.standard_normal(n),
        "spo2": 98.5 - 4 * s + 0.8 * rng.standard_normal(n),
        "fio2": np.where(rng.random(n) < s, 0.4 + 0.2 * rng.random(n), 0.21),
        "temp": 36.8 + 0.9 * s + 0.35 * rng.standard_normal(n),
        "glucose": 115 + 50 * s + 18 * rng.standard_normal(n),
        "ph": 7.41 - 0.06 * s + 0.025 * rng.standard_normal(n),
        "height": height,
        "weight": np.clip(rng.normal(27, 5, n), 17, 50) * (height / 100) ** 2,
        "gcs_drop": gcs_drop,
        "crr": (rng.random(n) < 0.1 + 0.5 * s).astype(float),
        "phase": rng.uniform(0, 24, n),
    }


def _ar1(rng: np.random.Generator, n: int, t: int, rho: float, sd: float, shared: np.ndarray | None = None) -> np.ndarray:
    eps = rng.standard_normal((n, t)) if shared is None else shared
    out = np.empty((n, t))
    out[:, 0] = eps[:, 0] * sd
    for k in range(1, t):
        out[:, k] = rho * out[:, k - 1] + np.sqrt(1 - rho**2) * sd * eps[:, k]
    return out


def _gcs(p: dict[str, np.ndarray], hours: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(p["severity"])
    drop = p["gcs_drop"][:, None] * rng.integers(0, 3, (n, hours))
    eye = np.clip(4 - drop - (rng.random((n, hours)) < 0.05), 1, 4)
    motor = np.clip(6 - drop - (rng.random((n, hours)) < 0.05), 1, 6)
    verbal = np.clip(5 - 2 * drop - (rng.random((n, hours)) < 0.08), 1, 5)
    return eye.astype(float), motor.astype(float), verbal.astype(float)


def generate_vitals(patients: int = 400, hours: int = 48, seed: int = 0, anomaly_fraction: float = 0.0,
                    severity_scale: float = 1.0) -> VitalsCohort:
    """Hourly vitals for ``patients`` × ``hours``; a fraction of rows (never a patient's first) gets an anomaly.
    ``severity_scale`` > 1 admits sicker patients (1.3: a ward 30% sicker; the same seed draws the same patients)."""
    rng = np.random.default_rng(seed)
    p = _patients(patients, rng, severity_scale)
    n, t = patients, hours
    clock = (np.arange(t)[None, :] + p["phase"][:, None]) * 2 * np.pi / 24
    circ = np.sin(clock)
    bp_shared = rng.standard_normal((n, t))
    v = np.full((n, t, len(VITALS)), np.nan)
    sbp = p["sbp"][:, None] + 5 * circ + _ar1(rng, n, t, 0.8, 8, bp_shared) + 3 * rng.standard_normal((n, t))
    dbp = p["dbp"][:, None] + 3 * circ + _ar1(rng, n, t, 0.8, 5, bp_shared) + 2 * rng.standard_normal((n, t))
    dbp = np.minimum(dbp, sbp - 15)
    v[..., INDEX["Systolic blood pressure"]] = sbp
    v[..., INDEX["Diastolic blood pressure"]] = dbp
    v[..., INDEX["Mean blood pressure"]] = dbp + (sbp - dbp) / 3 + 1.5 * rng.standard_normal((n, t))
    v[..., INDEX["Heart Rate"]] = p["hr"][:, None] + 4 * circ + _ar1(rng, n, t, 0.85, 6) - 0.15 * (sbp - p["sbp"][:, None])
    v[..., INDEX["Respiratory rate"]] = p["rr"][:, None] + _ar1(rng, n, t, 0.7, 2.0)
    v[..., INDEX["Oxygen saturation"]] = np.minimum(100, p["spo2"][:, None] + _ar1(rng, n, t, 0.6, 1.0))
    v[..., INDEX["Fraction inspired oxygen"]] = np.clip(p["fio2"][:, None] + 0.03 * rng.standard_normal((n, t)) * (p["fio2"][:, None] > 0.21), 0.21, 1.0)
    v[..., INDEX["Temperature"]] = p["temp"][:, None] + 0.25 * np.sin(clock - 1.0) + _ar1(rng, n, t, 0.8, 0.2)
    v[..., INDEX["Glucose"]] = p["glucose"][:, None] + _ar1(rng, n, t, 0.5, 20)
    v[..., INDEX["pH"]] = p["ph"][:, None] + _ar1(rng, n, t, 0.7, 0.02)
    v[..., INDEX["Height"]] = p["height"][:, None]
    v[..., INDEX["Weight"]] = p["weight"][:, None] + 0.3 * rng.standard_normal((n, t))
    v[..., INDEX["Capillary refill rate"]] = p["crr"][:, None]
    eye, motor, verbal = _gcs(p, t, rng)
    v[..., INDEX["Glascow coma scale eye opening"]] = eye
    v[..., INDEX["Glascow coma scale motor response"]] = motor
    v[..., INDEX["Glascow coma scale verbal response"]] = verbal
    v[..., INDEX["Glascow coma scale total"]] = eye + motor + verbal
    for j, var in enumerate(VITALS):
        if not var.discrete:
            v[..., j] = np.round(np.clip(v[..., j], var.low, var.high), 2 if var.high < 10 else 1)
    # Missingness: GCS components are charted together; height and weight mostly at admission.
    observed = rng.random((n, t, len(VITALS))) < _OBSERVED
    gcs = [INDEX[k] for k in VITAL_NAMES if k.startswith("Glascow")]
    observed[..., gcs] = observed[..., gcs[:1]]
    observed[:, 0, INDEX["Height"]] = rng.random(n) < 0.4
    observed[:, 0, INDEX["Weight"]] = rng.random(n) < 0.7
    observed[:, 0, INDEX["Heart Rate"]] = True
    v[~observed] = np.nan

    values = v.reshape(n * t, -1)
    patient = np.repeat(np.arange(n), t)
    hour = np.tile(np.arange(t), n)
    kind = np.full(n * t, NORMAL, dtype=object)
    feature = np.full(n * t, -1)
    if anomaly_fraction > 0:
        candidates = np.flatnonzero(hour > 0)
        rows = rng.choice(candidates, int(round(anomaly_fraction * len(values))), replace=False)
        for r in rows:
            kind[r], feature[r] = plant_vital_anomaly(values[r], rng)
    return VitalsCohort(values.astype(np.float32), patient, hour, kind.astype(str), feature)


_UNIT_ERRORS = {
    "Temperature": lambda x: x * 9 / 5 + 32,  # °F
    "Weight": lambda x: x * 2.2046,  # lb
    "Glucose": lambda x: x / 18.0,  # mmol/L
    "Height": lambda x: x / 2.54,  # inches
    "Fraction inspired oxygen": lambda x: x * 100,  # percent
}
_IMPLAUSIBLE = {
    "Heart Rate": (250, 320), "Oxygen saturation": (101, 130), "Temperature": (43, 47),
    "pH": (7.9, 8.4), "Respiratory rate": (60, 90), "Systolic blood pressure": (280, 350),
}


def plant_vital_anomaly(row: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[str, int]:
    """Modify one record in place; returns ``(kind, planted feature index or −1)``.

    The planted variable is made observed if it was missing (an anomaly must be visible).
    """
    kind = kind or str(rng.choice(["hypotension", "unit_error", "implausible"]))
    if kind == "hypotension":
        sbp = rng.uniform(62, 78)
        dbp = rng.uniform(30, 42)
        row[INDEX["Systolic blood pressure"]] = sbp
        row[INDEX["Diastolic blood pressure"]] = dbp
        row[INDEX["Mean blood pressure"]] = dbp + (sbp - dbp) / 3
        hr = row[INDEX["Heart Rate"]]
        row[INDEX["Heart Rate"]] = (hr if np.isfinite(hr) else 90) + rng.uniform(15, 35)
        return kind, INDEX["Systolic blood pressure"]
    table = _UNIT_ERRORS if kind == "unit_error" else _IMPLAUSIBLE
    name = str(rng.choice(list(table)))
    j = INDEX[name]
    if kind == "unit_error":
        base = row[j] if np.isfinite(row[j]) else VITALS[j].normal
        row[j] = table[name](base)
    else:
        lo, hi = table[name]
        row[j] = rng.uniform(lo, hi)
    return kind, j


# ---------------------------------------------------------------- waveforms


def _pleth_beat(phase: np.ndarray) -> np.ndarray:
    """PLETH pulse over one beat, phase in [0, 1): systolic peak, dicrotic notch, diastolic wave."""
    return np.exp(-0.5 * ((phase - 0.2) / 0.075) ** 2) + 0.4 * np.exp(-0.5 * ((phase - 0.47) / 0.09) ** 2)


def _abp_beat(phase: np.ndarray) -> np.ndarray:
    """ABP pulse shape in [0, 1]: fast upstroke, systolic peak, notch, dicrotic wave, diastolic decay."""
    up = np.exp(-0.5 * ((phase - 0.13) / 0.055) ** 2)
    dicrotic = 0.28 * np.exp(-0.5 * ((phase - 0.4) / 0.04) ** 2)
    decay = 0.35 * np.exp(-(phase - 0.13) / 0.35) * (phase > 0.13)
    return np.clip(up + dicrotic + decay, 0, None) / 1.05


def _beat_times(rng: np.random.Generator, hr: float, resp_hz: float, seconds: float, ectopic: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Beat onset times (s) with HRV and respiratory sinus arrhythmia, plus per-beat amplitude factors."""
    mean_rr = 60.0 / hr
    times, amps, t = [], [], -rng.uniform(0, mean_rr)
    resp_phase = rng.uniform(0, 2 * np.pi)
    ectopic_at = set(rng.choice(np.arange(2, max(3, int(seconds / mean_rr) - 1)), ectopic, replace=False)) if ectopic else set()
    i, pending_pause = 0, False
    while t < seconds + 2 * mean_rr:
        rsa = 1 + 0.05 * np.sin(2 * np.pi * resp_hz * t + resp_phase)
        rr = mean_rr * rsa * (1 + 0.025 * rng.standard_normal())
        amp = 1.0
        if i in ectopic_at:
            rr, amp, pending_pause = mean_rr * 0.55, 0.55, True
        elif pending_pause:
            rr, pending_pause = mean_rr * 1.45, False
        times.append(t)
        amps.append(amp)
        t += rr
        i += 1
    return np.array(times), np.array(amps)


def _render(t: np.ndarray, onsets: np.ndarray, amps: np.ndarray, shape, delay: float) -> np.ndarray:  # noqa: ANN001
    tt = t - delay
    k = np.clip(np.searchsorted(onsets, tt, side="right") - 1, 0, len(onsets) - 2)
    length = onsets[k + 1] - onsets[k]
    phase = np.clip((tt - onsets[k]) / length, 0, 1)
    # A premature (shortened) beat is drawn at its own, shorter length; its amplitude is reduced.
    return shape(phase) * amps[k]


def generate_window(rng: np.random.Generator, baseline: dict[str, float], kind: str = NORMAL) -> tuple[np.ndarray, tuple[int, int]]:
    """One ``(2, 1024)`` window (PLETH, ABP mmHg) for a patient ``baseline``; returns ``(window, segment)``."""
    n = WINDOW
    t = np.arange(n) / SAMPLE_RATE_HZ
    seconds = n / SAMPLE_RATE_HZ
    hr = baseline["hr"] * (1 + 0.03 * rng.standard_normal())
    resp = baseline["resp_hz"]
    ectopic = int(rng.integers(1, 3)) if kind == "ectopic" else 0
    onsets, amps = _beat_times(rng, hr, resp, seconds, ectopic)
    resp_wave = np.sin(2 * np.pi * resp * t + rng.uniform(0, 2 * np.pi))
    pleth = _render(t, onsets, amps, _pleth_beat, baseline["ptt"]) * (1 + 0.1 * resp_wave) * baseline["pleth_amp"]
    pleth = pleth + 0.05 * resp_wave + 0.1 + 0.01 * rng.standard_normal(n)
    sbp, dbp = baseline["sbp"], baseline["dbp"]
    abp = dbp + (sbp - dbp) * _render(t, onsets, amps, _abp_beat, 0.0) + 2.0 * resp_wave + 0.5 * rng.standard_normal(n)
    segment = (-1, -1)
    if kind == "ectopic":
        # From the first premature beat to the end of the last compensatory pause (the onset of the
        # beat after it), plus the pulse transit delay for PLETH.
        beats = np.flatnonzero(amps < 1)
        start = int(np.clip(onsets[beats[0]] * SAMPLE_RATE_HZ, 0, n - 1)) if len(beats) else 0
        end_s = onsets[min(beats[-1] + 2, len(onsets) - 1)] + baseline["ptt"] if len(beats) else seconds
        segment = (start, int(np.clip(end_s * SAMPLE_RATE_HZ, start + 1, n)))
    elif kind == "flatline":
        length = int(rng.uniform(2, 4) * SAMPLE_RATE_HZ)
        start = int(rng.integers(0, n - length))
        pleth[start : start + length] = 0.0 + 0.001 * rng.standard_normal(length)
        abp[start : start + length] = abp[start] + 0.05 * rng.standard_normal(length)
        segment = (start, start + length)
    elif kind == "motion":
        length = int(rng.uniform(1, 3) * SAMPLE_RATE_HZ)
        start = int(rng.integers(0, n - length))
        tt = np.arange(length) / SAMPLE_RATE_HZ
        burst = sum(rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * rng.uniform(0.5, 4) * tt + rng.uniform(0, 6)) for _ in range(3))
        burst = burst + 0.15 * rng.standard_normal(length)
        pleth[start : start + length] += burst * baseline["pleth_amp"] * np.hanning(length) * 1.5
        segment = (start, start + length)
    elif kind == "damped_abp":
        mean = abp.mean()
        kernel = np.ones(15) / 15
        abp = mean + 0.5 * (np.convolve(abp - mean, kernel, mode="same"))
        segment = (0, n)
    elif kind != NORMAL:
        raise ValueError(f"unknown waveform anomaly kind {kind!r}")
    return np.stack([pleth, abp]).astype(np.float32), segment


def _wave_baselines(rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    s = rng.beta(2, 5, n)
    sbp = 122 - 10 * s + 14 * rng.standard_normal(n)
    return [
        {"hr": float(np.clip(75 + 25 * s[i] + 9 * rng.standard_normal(), 50, 140)), "resp_hz": float(rng.uniform(0.2, 0.4)),
         "sbp": float(np.clip(sbp[i], 90, 180)), "dbp": float(np.clip(0.45 * sbp[i] + 8 + 6 * rng.standard_normal(), 40, 95)),
         "ptt": float(rng.uniform(0.15, 0.3)), "pleth_amp": float(rng.uniform(0.6, 1.2))}
        for i in range(n)
    ]


def generate_waveforms(patients: int = 200, windows_per_patient: int = 20, seed: int = 0, anomaly_fraction: float = 0.0,
                       kinds: tuple[str, ...] | None = None) -> WaveformCohort:
    """``patients × windows_per_patient`` windows; a fraction carries an anomaly (kinds drawn uniformly)."""
    from .mimic_schema import WAVE_ANOMALIES

    rng = np.random.default_rng(seed)
    base = _wave_baselines(rng, patients)
    total = patients * windows_per_patient
    kinds = kinds or WAVE_ANOMALIES
    labels = np.full(total, NORMAL, dtype=object)
    anomalous = rng.choice(total, int(round(anomaly_fraction * total)), replace=False)
    labels[anomalous] = rng.choice(list(kinds), len(anomalous))
    windows = np.empty((total, 2, WINDOW), dtype=np.float32)
    segments = np.full((total, 2), -1)
    patient = np.repeat(np.arange(patients), windows_per_patient)
    for i in range(total):
        windows[i], segments[i] = generate_window(rng, base[patient[i]], labels[i])
    return WaveformCohort(windows, patient, labels.astype(str), segments)
