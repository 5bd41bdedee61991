"""Serving over HTTP: the OpenAI API (completions, chat completions, streaming) over a session.

:class:`OpenAIServer` is what ``dspark serve --port`` runs; :mod:`dspark.serving.protocol` reads
and writes the API's bodies; :class:`EngineLoop` steps the session on a thread of its own.
"""

from dspark.serving.http import OpenAIServer
from dspark.serving.loop import EngineLoop
from dspark.serving.protocol import Job, ProtocolError, parse_request

__all__ = ["EngineLoop", "Job", "OpenAIServer", "ProtocolError", "parse_request"]
