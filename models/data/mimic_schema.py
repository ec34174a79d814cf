"""Schemas of the two MIMIC-style record kinds: clinical vitals/labs and bedside waveform windows.

Vitals are the 17 variables of the MIMIC-III benchmark (Harutyunyan et al. 2019), named exactly as
in its per-episode ``*_timeseries.csv`` files (including the benchmark's "Glascow" spelling), one
record per patient-hour. ``NORMAL`` holds the benchmark's normal values, used to impute a variable
never observed in an episode. Waveforms are PLETH and ABP at 125 Hz (the MIMIC-III Waveform
Database rate) in non-overlapping windows of 1024 samples.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    """One vital sign or lab: benchmark name, unit, plausible range, discrete or continuous."""

    name: str
    unit: str
    low: float
    high: float
    normal: float
    discrete: bool = False


VITALS: tuple[Variable, ...] = (
    Variable("Capillary refill rate", "0 normal / 1 delayed", 0, 1, 0.0, discrete=True),
    Variable("Diastolic blood pressure", "mmHg", 20, 140, 59.0),
    Variable("Fraction inspired oxygen", "fraction", 0.21, 1.0, 0.21),
    Variable("Glascow coma scale eye opening", "score 1-4", 1, 4, 4, discrete=True),
    Variable("Glascow coma scale motor response", "score 1-6", 1, 6, 6, discrete=True),
    Variable("Glascow coma scale total", "score 3-15", 3, 15, 15, discrete=True),
    Variable("Glascow coma scale verbal response", "score 1-5", 1, 5, 5, discrete=True),
    Variable("Glucose", "mg/dL", 40, 500, 128.0),
    Variable("Heart Rate", "beats/min", 30, 200, 86.0),
    Variable("Height", "cm", 140, 210, 170.0),
    Variable("Mean blood pressure", "mmHg", 30, 160, 77.0),
    Variable("Oxygen saturation", "%", 70, 100, 98.0),
    Variable("Respiratory rate", "breaths/min", 5, 45, 19.0),
    Variable("Systolic blood pressure", "mmHg", 60, 230, 118.0),
    Variable("Temperature", "°C", 34, 41, 36.6),
    Variable("Weight", "kg", 40, 200, 81.0),
    Variable("pH", "pH", 6.9, 7.7, 7.4),
)
VITAL_NAMES: tuple[str, ...] = tuple(v.name for v in VITALS)
INDEX: dict[str, int] = {n: i for i, n in enumerate(VITAL_NAMES)}

# Coupled variables, attributed together (models.anomaly.attribution): the pressures move together in
# hypotension, and the Glasgow total is the sum of its components.
VITAL_GROUPS: dict[str, tuple[str, ...]] = {
    "blood pressure": ("Systolic blood pressure", "Diastolic blood pressure", "Mean blood pressure"),
    "Glasgow coma scale": ("Glascow coma scale eye opening", "Glascow coma scale motor response",
                           "Glascow coma scale verbal response", "Glascow coma scale total"),
}
# Derived variables: the sum of their components (samples compute them; models.sampling).
VITAL_DERIVED: dict[str, tuple[str, ...]] = {
    "Glascow coma scale total": ("Glascow coma scale eye opening", "Glascow coma scale motor response",
                                 "Glascow coma scale verbal response"),
}

# Text forms of the Glasgow coma scale components in MIMIC-III (CareVue and MetaVision spellings).
GCS_TEXT: dict[str, dict[str, float]] = {
    "Glascow coma scale eye opening": {
        "no response": 1, "to pain": 2, "to speech": 3, "spontaneously": 4,
    },
    "Glascow coma scale motor response": {
        "no response": 1, "abnorm extensn": 2, "abnormal extension": 2, "abnorm flexion": 3, "abnormal flexion": 3,
        "flex-withdraws": 4, "localizes pain": 5, "obeys commands": 6,
    },
    "Glascow coma scale verbal response": {
        "no response": 1, "no response-ett": 1, "et/trach": 1, "incomp sounds": 2, "incomprehensible sounds": 2,
        "inapprop words": 3, "inappropriate words": 3, "confused": 4, "oriented": 5,
    },
}
GCS_LABELS: dict[str, dict[int, str]] = {
    "Glascow coma scale eye opening": {1: "1 No Response", 2: "2 To pain", 3: "3 To speech", 4: "4 Spontaneously"},
    "Glascow coma scale motor response": {1: "1 No Response", 2: "2 Abnorm extensn", 3: "3 Abnorm flexion",
                                          4: "4 Flex-withdraws", 5: "5 Localizes Pain", 6: "6 Obeys Commands"},
    "Glascow coma scale verbal response": {1: "1 No Response", 2: "2 Incomp sounds", 3: "3 Inapprop words",
                                           4: "4 Confused", 5: "5 Oriented"},
}

SAMPLE_RATE_HZ = 125
WINDOW = 1024
WAVE_CHANNELS: tuple[str, ...] = ("PLETH", "ABP")
WAVE_UNITS: tuple[str, ...] = ("NU", "mmHg")
# Fixed global scaling for serving across patients: (x − offset) / scale per channel.
WAVE_SCALING: dict[str, tuple[float, float]] = {"PLETH": (0.5, 0.5), "ABP": (90.0, 40.0)}

VITAL_ANOMALIES = ("hypotension", "unit_error", "implausible")
WAVE_ANOMALIES = ("ectopic", "flatline", "motion", "damped_abp")
