"""What the service's processes share, and all they share: tensors in shared memory and control messages
over a Unix socket (:mod:`~service.ipc.transport`), the messages' types and codec
(:mod:`~service.ipc.messages`), and what the supervisor tells each child (:mod:`~service.ipc.children`).
"""
