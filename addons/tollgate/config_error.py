"""The one error type for a bad policy section judged by its own module (rate_limits, budgeting).

It carries the key path and the problem apart, so policy.py can re-raise it as a PolicyError that also
names the file.
"""
from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, keypath: str, problem: str):
        self.keypath = keypath
        self.problem = problem
        super().__init__(f"{keypath}: {problem}")
