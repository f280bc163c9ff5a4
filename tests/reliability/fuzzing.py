"""Hypothesis settings shared by the fuzz tests.

The suite runs the same examples every time (derandomized: a red CI must mean a change broke something, not
that a new input was drawn). To explore new inputs, set FPT_FUZZ_EXAMPLES, e.g.
``FPT_FUZZ_EXAMPLES=2000 pytest tests/reliability``, and pin what it finds with ``@example``.
"""
import os

from hypothesis import HealthCheck, settings


def fuzz_settings(examples: int) -> settings:
    """``examples`` fixed examples per test, or FPT_FUZZ_EXAMPLES freshly drawn ones."""
    explore = os.environ.get("FPT_FUZZ_EXAMPLES")
    return settings(max_examples=int(explore or examples), derandomize=explore is None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
