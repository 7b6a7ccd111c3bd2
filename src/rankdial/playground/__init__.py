"""The playground: a local web page where the rank dial, the memory bill, NF4 and merging respond to the library.

`rankdial playground [--port 7860]` serves it on 127.0.0.1 (create_app, serve).
"""

from .app import create_app, serve
from .jobs import JobManager, Limits

__all__ = ["create_app", "serve", "JobManager", "Limits"]
