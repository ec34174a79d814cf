"""Anomaly scores from a flow's density: scoring against a calibration, the marginal likelihood of
records with absent features, per-pattern calibrations, attribution, and building calibrations.

The modules import nothing heavy here: the service's HTTP front-ends import the scoring modules
without torch.
"""
