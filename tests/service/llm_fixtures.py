"""The `chat` fixture: the scripted chat-completions server of llm_server.py, one per test
session, emptied for each test. Test modules load it with ``pytest_plugins``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llm_server import ChatServer, chat_server


@pytest.fixture(scope="session")
def _chat_server() -> Iterator[ChatServer]:
    with chat_server() as server:
        yield server


@pytest.fixture
def chat(_chat_server: ChatServer) -> ChatServer:
    """The scripted server with no requests, queue or script left from another test."""
    _chat_server.reset()
    return _chat_server
