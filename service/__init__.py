"""flowserve's HTTP service: exact log-likelihoods, anomaly scores, drift alarms and samples from trained flows.

The rooms, from the top down (``docs/architecture.md`` follows a request through them):

* :mod:`service.cli`, :mod:`service.server`, :mod:`service.supervisor`, :mod:`service.doctor`: the
  ``flowserve`` command, serving in one process or under a supervisor, and the machine report;
* :mod:`service.frontend`: the HTTP front-end process (FastAPI app, codecs, middleware, uvicorn) and
  its view of the executors; it never imports torch;
* :mod:`service.executor`: the model-executor process (repository, batching, runners, traced graphs,
  ONNX Runtime sessions, self-checks) that owns a device;
* :mod:`service.core`: the inference core every protocol calls, in any process (scoring, anomaly
  scores, drift, the model entry and repository protocol);
* :mod:`service.ipc`: the only thing the processes share (shared-memory tensors, typed control
  messages and their codec, what the supervisor tells its children);
* :mod:`service.settings`, :mod:`service.errors`, :mod:`service.metrics`, :mod:`service.heap`: leaves
  every room may use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def serve(settings: Settings | None = None) -> None:
    """Serve the repository that ``settings`` (default: ``FLOWSERVE_*`` variables) names until SIGTERM."""
    from service.server import serve as _serve
    from service.settings import Settings

    _serve(settings or Settings())


__all__ = ["serve"]
