"""Plugins by entry point (forgetpack.format.registry): one scan a group, a rescan before 'unknown'."""

from __future__ import annotations

from importlib import metadata

import pytest

from forgetpack.format import registry
from forgetpack.format.errors import ForgetpackError


def test_a_group_is_scanned_once_and_again_only_for_a_name_it_lacks(monkeypatch) -> None:
    scans = []
    installed = [metadata.EntryPoint("first", "json:dumps", "test.group")]

    def entry_points(group: str):
        scans.append(group)
        return [ep for ep in installed if ep.group == group]

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_SCANNED", {})
    for _ in range(100):
        assert registry.load("test.group", "first", "toy") is __import__("json").dumps
    assert scans == ["test.group"]  # a runtime.load or a rank loop does not read every .dist-info again
    installed.append(metadata.EntryPoint("second", "json:loads", "test.group"))  # installed meanwhile
    assert registry.find("test.group", "second", "toy").value == "json:loads"
    assert scans == ["test.group"] * 2
    with pytest.raises(ForgetpackError, match=r"unknown toy 'third' \(installed: first, second; .*test\.group\)"):
        registry.find("test.group", "third", "toy")
    installed.append(metadata.EntryPoint("broken", "no_such_module_here:x", "test.group"))
    with pytest.raises(ForgetpackError, match="toy 'broken' cannot be imported"):
        registry.load("test.group", "broken", "toy")
