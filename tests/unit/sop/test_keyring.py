"""The processor's robot keyring (robots.json of `sop robot add`): read again when it changes, so that a robot added
while the processor runs is known and a revoked one refused; a damaged file never empties it."""

from __future__ import annotations

import base64
import json
import os

import click
import pytest

from sop.commands.process import Keyring


def _write(path, robots: dict) -> None:  # noqa: ANN001
    path.write_text(json.dumps({"version": 1, "robots": {
        name: {"key": base64.b64encode(bytes([i]) * 32).decode(), "actors": [name]} for i, name in enumerate(robots)}}))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime even within the clock's tick


def test_added_and_revoked_robots_show_at_the_next_check(tmp_path) -> None:
    path = tmp_path / "robots.json"
    ring = Keyring(path, every_s=0)
    assert ring.robots() == {}  # no robot added yet
    _write(path, {"r1": 1})
    assert set(ring.robots()) == {"r1"}
    _write(path, {"r1": 1, "r2": 1})
    assert set(ring.robots()) == {"r1", "r2"}
    _write(path, {"r2": 1})  # r1 revoked
    assert set(ring.robots()) == {"r2"}
    path.write_text("{damaged")
    assert set(ring.robots()) == {"r2"}  # the last good keyring, not none
    path.unlink()
    assert ring.robots() == {}


def test_a_damaged_keyring_stops_the_processor_at_start(tmp_path) -> None:
    path = tmp_path / "robots.json"
    path.write_text(json.dumps({"robots": {"r1": {"key": "short"}}}))
    with pytest.raises(click.ClickException, match="r1"):
        Keyring(path)
