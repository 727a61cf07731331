"""Configuration mistakes: each is one error naming the file it is in (local.toml or the tracked
file), the table and the key, with the known keys or the expected type as the hint."""

from __future__ import annotations

import pytest

from kseries.config import Config
from kseries.errors import ToolkitError
from tests.conftest import Project


def test_a_file_that_is_not_utf8_names_the_byte_offset(project: Project) -> None:
    configs = project.configs
    text = b'[default_tree]\npackage = "linux-source-7.2"\n'
    offset = text.index(b"linux-source")
    (configs / "toolkit.toml").write_bytes(text[:offset] + b"\xe9" + text[offset + 1 :])
    with pytest.raises(ToolkitError) as caught:
        Config.load(configs)
    assert caught.value.message == (
        f"{configs / 'toolkit.toml'}: not UTF-8: byte 0xe9 at offset {offset}"
    )
    (configs / "toolkit.toml").write_bytes(text)
    (configs / "local.toml").write_bytes(b'[tree]\npath = "\xff"\n')
    with pytest.raises(ToolkitError) as caught:
        Config.load(configs)
    assert caught.value.message == f"{configs / 'local.toml'}: not UTF-8: byte 0xff at offset 15"
    assert caught.value.hint == "save the file as UTF-8"
