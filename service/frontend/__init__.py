"""The HTTP front-end process (``python -m service.frontend``): FastAPI app, codecs, middleware, uvicorn.

:mod:`~service.frontend.app` builds the app; :mod:`~service.frontend.api` holds the codecs (v1 REST and
the Open Inference Protocol), which call only the inference core (:mod:`service.core`);
:mod:`~service.frontend.remote` mirrors the executors' model tables and hands them tensors. No torch here.
"""
