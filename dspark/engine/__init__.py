"""The decoding engine: prefill, then speculative rounds until every request is done.

:class:`Engine` (:mod:`dspark.engine.core`) runs the rounds — one round reads top to bottom in
``Engine._round``; :mod:`dspark.engine.prefill` admits requests into a batch's slots and prefills
their prompts; :mod:`dspark.engine.batch` holds a batch and its requests;
:mod:`dspark.engine.stopping` appends the emitted tokens and ends requests;
:mod:`dspark.engine.config` is the ``engine`` config section.
"""

from dspark.engine.batch import Batch, Request, Scores
from dspark.engine.config import BATCHING, EngineConfig
from dspark.engine.core import Engine

__all__ = ["BATCHING", "Batch", "Engine", "EngineConfig", "Request", "Scores"]
