"""The inference core: what every protocol (v1 REST, V2) calls, in a front-end or in the single process.

:mod:`~service.core.inference` scores, samples and assesses anomalies over a
:class:`~service.core.entry.Repository` (in-process or remote); :mod:`~service.core.tasks` says what each
task returns and makes its per-request inputs; :mod:`~service.core.drift` holds the drift monitors. No torch.
"""
