"""Keep secrets out of every log line, whoever logs it (tollgate, mitmproxy, a library).

A log-record factory scrubs each record as it is created, so the scrubbing holds for every handler
mitmproxy installs (terminal, event log, mitmweb) without knowing about them. It masks the policy's own
secrets exactly and anything shaped like a provider or tollgate key by pattern.
"""
from __future__ import annotations

import logging
import re

MASK = "[REDACTED]"
# Provider key shapes (OpenAI sk-/sk-proj-, Anthropic sk-ant-, Google AIza…) and tollgate's virtual keys.
KEY_SHAPES = r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{30,}|tg-[A-Za-z0-9_-]{20,}"


_PREFIXES = ("sk-", "AIza", "tg-")  # every KEY_SHAPES match starts with one of these


def scrub(text: str, pattern: re.Pattern) -> str:
    return pattern.sub(MASK, text)


def build_pattern(secrets: list[str]) -> re.Pattern:
    exact = [re.escape(s) for s in sorted(set(secrets), key=len, reverse=True) if s]
    return re.compile("|".join(exact + [KEY_SHAPES]))


class RedactingFilter:
    def __init__(self) -> None:
        self.pattern = build_pattern([])
        self.secrets: tuple[str, ...] = ()
        self._previous = None

    def set_secrets(self, secrets: list[str]) -> None:
        self.pattern = build_pattern(secrets)
        self.secrets = tuple(s for s in secrets if s)

    def might_hold_secret(self, msg: str) -> bool:
        return any(p in msg for p in _PREFIXES) or any(s in msg for s in self.secrets)

    def install(self) -> None:
        if self._previous is not None:
            return
        previous = self._previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            try:
                msg = record.getMessage()
            except Exception:  # a broken format string is the caller's bug; leave the record alone
                return record
            if self.might_hold_secret(msg):  # cheap substring checks first; the regex only on a hit
                clean = self.pattern.sub(MASK, msg)
                if clean != msg:
                    record.msg, record.args = clean, ()
            return record

        logging.setLogRecordFactory(factory)

    def uninstall(self) -> None:
        if self._previous is not None:
            logging.setLogRecordFactory(self._previous)
            self._previous = None
