"""Environment reads of the routing thresholds: ``env_text`` / ``env_nonnegative_int`` answer as
``os.environ.get`` does, per call, through its cheaper storage read."""
import os

import pytest

from lora_kernels.ops.checks import env_nonnegative_int, env_text

NAME = "LORA_KERNELS_TEST_ENV_READ"


@pytest.mark.parametrize("value", ["7", " 12 ", "", "déjà vu", "a=b"])
def test_env_text_is_environ_get(monkeypatch, value):
    monkeypatch.delenv(NAME, raising=False)
    assert env_text(NAME) == os.environ.get(NAME, "") == ""
    monkeypatch.setenv(NAME, value)
    assert env_text(NAME) == os.environ.get(NAME, "") == value
    monkeypatch.setenv(NAME, value + "1")  # a change after a first read is seen by the next
    assert env_text(NAME) == value + "1"
    monkeypatch.delenv(NAME)
    assert env_text(NAME) == ""
    assert env_text(NAME, "auto") == os.environ.get(NAME, "auto") == "auto"
    monkeypatch.setenv(NAME, "")
    assert env_text(NAME, "auto") == ""  # set but empty is not unset


def test_env_nonnegative_int_follows_changes(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_nonnegative_int(NAME, 5) == 5
    assert env_nonnegative_int(NAME, 6) == 6  # the default is part of what is remembered
    for text, value in (("3", 3), (" 40 ", 40), ("0", 0), ("", 5)):
        monkeypatch.setenv(NAME, text)
        assert env_nonnegative_int(NAME, 5) == value
    for bad in ("-1", "2.5", "many"):
        monkeypatch.setenv(NAME, bad)
        with pytest.raises(ValueError, match=NAME):
            env_nonnegative_int(NAME, 5)
        with pytest.raises(ValueError, match=NAME):  # not remembered as valid after a first failure
            env_nonnegative_int(NAME, 5)
    monkeypatch.setenv(NAME, "9")
    assert env_nonnegative_int(NAME, 5) == 9
