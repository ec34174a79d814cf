"""The model-executor process (``python -m service.executor``): one per device, owner of its models.

:mod:`~service.executor.process` answers the front-ends' control messages;
:mod:`~service.executor.repository` loads and swaps model versions; :mod:`~service.executor.batching`
forms batches; :mod:`~service.executor.runners` computes them (torch, traced graphs, ONNX Runtime) on a
:mod:`~service.executor.workers` thread; :mod:`~service.executor.selfcheck` checks every optimised path at load.
"""
