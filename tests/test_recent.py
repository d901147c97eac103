"""The bounded memo every in-process cache uses (forgetpack.format.recent)."""

from __future__ import annotations

from forgetpack.format.recent import Recent


def test_keeps_the_most_recently_used_and_computes_a_value_once() -> None:
    calls: list[str] = []
    memo: Recent[str] = Recent(2)

    def value(key: str):
        return lambda: calls.append(key) or key.upper()

    assert memo.get("a", value("a")) == "A" and memo.get("b", value("b")) == "B"
    assert memo.get("a", value("a")) == "A"  # kept: not computed again, and now the most recent
    assert memo.get("c", value("c")) == "C"  # over the bound: "b", the least recently used, goes
    assert len(memo) == 2 and calls == ["a", "b", "c"]
    assert memo.get("a", value("a")) == "A" and memo.get("b", value("b")) == "B"
    assert calls == ["a", "b", "c", "b"]
    memo.get("none", lambda: None)
    assert memo.get("none", value("none")) is None and calls[-1] == "b"  # a kept None is a value too
    memo.clear()
    assert len(memo) == 0
