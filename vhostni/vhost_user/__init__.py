"""vhost-user: the control protocol between QEMU (front-end) and the NI (back-end).

``proto`` is the sans-I/O codec; everything public in it is re-exported here.
"""

from .proto import *  # noqa: F401,F403
from .proto import __all__  # noqa: F401
