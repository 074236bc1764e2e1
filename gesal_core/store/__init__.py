"""Where a channel's graph, replies, votes and feedback buffer live.

`Store` is the contract; `MemoryStore` backs tests and the evaluation harness, and the
Redis implementation is the production system of record.
"""

from .base import ConflictError, Store, UnknownReplyError
from .memory import MemoryStore

__all__ = ["ConflictError", "MemoryStore", "Store", "UnknownReplyError"]
