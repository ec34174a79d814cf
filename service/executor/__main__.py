"""``python -m service.executor``: one model-executor process (started by the supervisor)."""

from service.executor.process import main

main()
