"""Talking to models: the OpenAI-compatible client, exact option scoring, structured extraction. No Dagster here."""

from grace_dagster.llm.client import LLMClient, LLMError, LLMRequestError, LLMUnavailableError, RetryPolicy
from grace_dagster.llm.scoring import OptionScores, ScoringError, score_options

__all__ = [
    "LLMClient",
    "LLMError",
    "LLMRequestError",
    "LLMUnavailableError",
    "OptionScores",
    "RetryPolicy",
    "ScoringError",
    "score_options",
]
