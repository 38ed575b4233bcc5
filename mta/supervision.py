"""The restart policy shared by pochta's two supervisors: `pochta up`'s of the server
processes (admin/serve.py) and the MTA's of its queue runner (mta/server.py), and what the
queue runner inherits from its MTA."""

import os
import pickle

from store.config import Config, ConfigError


def restart_delay(restarts: int) -> float:
    """Seconds before restarting a process that died ``restarts`` times already: 1, 2, 4...
    up to 30, so that a process that dies at once does not spin."""
    return min(30.0, 2.0 ** min(restarts, 5))


PARENT_PIPE = "POCHTA_QUEUE_PARENT_PIPE"  # set by `serve mta`: our stdin is a pipe from it


def inherited_config() -> Config:
    """The config the MTA that started us runs with, first thing on the pipe from it.

    Not the file: it may have changed since (a reload the MTA refused), and a queue runner that
    could not start on it would leave delivery stopped until someone fixed the file."""
    size = int.from_bytes(_read_exactly(0, 8), "big")
    cfg = pickle.loads(_read_exactly(0, size))
    if not isinstance(cfg, Config):
        raise ConfigError("the MTA sent the queue runner no config")
    return cfg


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise ConfigError("the MTA that started the queue runner is gone")
        data += chunk
    return data
