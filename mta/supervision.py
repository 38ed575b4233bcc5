"""The restart policy shared by pochta's two supervisors: `pochta up`'s of the server
processes (admin/serve.py) and the MTA's of its queue runner (mta/server.py)."""


def restart_delay(restarts: int) -> float:
    """Seconds before restarting a process that died ``restarts`` times already: 1, 2, 4...
    up to 30, so that a process that dies at once does not spin."""
    return min(30.0, 2.0 ** min(restarts, 5))
