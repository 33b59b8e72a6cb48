import logging

import pytest

from tollgate.redact import MASK, RedactingFilter


@pytest.fixture
def redactor():
    r = RedactingFilter()
    r.set_secrets(["my-master-secret-value", "plain-real-key-without-prefix"])
    r.install()
    yield r
    r.uninstall()


@pytest.mark.parametrize("msg", [
    "auth header Bearer sk-proj-FAKE-test-abcdefghijklmnop",
    "anthropic sk-ant-api03-FAKE-test-abcdefghijklmn",
    "gemini key=AIzaFAKE-test-gemini-abcdefghij0000000000",
    "virtual tg-F0T0g-FAKE-test-virtual-key-0000000000",
    "master my-master-secret-value seen",
    "custom plain-real-key-without-prefix in a url",
])
def test_secrets_never_reach_a_log_record(redactor, caplog, msg):
    with caplog.at_level(logging.INFO):
        logging.getLogger("some.library").info("%s", msg)
    text = caplog.records[-1].getMessage()
    assert MASK in text
    assert "abcdefghij" not in text and "my-master" not in text and "plain-real" not in text and "F0T0g" not in text


@pytest.mark.parametrize("msg", ["client connect 127.0.0.1:5555", "task-123 done", "sk-short"])
def test_ordinary_lines_untouched(redactor, caplog, msg):
    with caplog.at_level(logging.INFO):
        logging.getLogger("x").info(msg)
    assert caplog.records[-1].getMessage() == msg
