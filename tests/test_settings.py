"""atomforge's settings are read once and kept while their sources stay the same, and
read anew as soon as an ``ATOMFORGE_*`` variable or the ``.env`` file changes."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from atomforge.flows.settings import get_settings


def test_unchanged_sources_give_the_same_settings():
    assert get_settings() is get_settings()


def test_a_changed_variable_is_read_by_the_next_call(monkeypatch):
    monkeypatch.setenv("ATOMFORGE_RETRIES", "1")
    first = get_settings()
    monkeypatch.setenv("ATOMFORGE_RETRIES", "7")
    assert (first.retries, get_settings().retries) == (1, 7)
    monkeypatch.delenv("ATOMFORGE_RETRIES")
    assert get_settings().retries == 3


def test_a_changed_env_file_is_read_by_the_next_call(tmp_path, monkeypatch):
    monkeypatch.delenv("ATOMFORGE_TABLE_ROWS", raising=False)
    monkeypatch.chdir(tmp_path)
    dotenv = tmp_path / ".env"
    dotenv.write_text("ATOMFORGE_TABLE_ROWS=12\n")
    assert get_settings().table_rows == 12
    dotenv.write_text("ATOMFORGE_TABLE_ROWS=345\n")
    os.utime(dotenv, ns=(1, 1))  # a new modification time even within the clock's tick
    assert get_settings().table_rows == 345
    dotenv.unlink()
    assert get_settings().table_rows == 1000


def test_settings_cannot_be_changed_in_place():
    with pytest.raises(ValidationError):
        get_settings().retries = 0
