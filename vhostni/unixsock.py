"""Unix socket helpers shared by the data plane's vhost-user listeners and the admin plane's."""
from __future__ import annotations

import os
import socket
import stat


def socket_in_use(path: str) -> bool:
    """True if a unix socket at ``path`` has a listener (so it is not a stale one to replace)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True                   # a listener with a full backlog
    except OSError:
        return True
    finally:
        s.close()
    return True
