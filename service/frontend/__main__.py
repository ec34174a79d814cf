"""``python -m service.frontend``: one HTTP front-end process (started by the supervisor)."""

from service.frontend.process import main

main()
