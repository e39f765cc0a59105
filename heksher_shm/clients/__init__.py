"""Heksher clients: asynchronous, thread-based, and stubs for tests."""

from heksher_shm.clients.async_client import AsyncHeksherClient
from heksher_shm.clients.thread_client import ThreadHeksherClient

__all__ = ["AsyncHeksherClient", "ThreadHeksherClient"]
