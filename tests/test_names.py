"""Misspelt names are named with the close matches a typo most likely meant."""

from __future__ import annotations

from gaisnet_flwr.names import close_matches, unknown_names

KEYS = ["num-rounds", "num-prompts", "lr", "local-epochs", "strategy"]


def test_a_typo_gets_its_closest_valid_name_first() -> None:
    assert close_matches("num-round", KEYS)[0] == "num-rounds"
    assert close_matches("stratgey", KEYS) == ["strategy"]
    assert close_matches("zzz", KEYS) == []


def test_the_message_names_each_unknown_key_its_matches_and_every_valid_key() -> None:
    message = unknown_names("run-config key", ["num-round", "zzz"], KEYS)
    assert message.startswith("unknown run-config keys 'num-round' (did you mean 'num-rounds'")
    assert "'zzz'; valid run-config keys: " in message  # no match: no hint
    assert message.endswith("local-epochs, lr, num-prompts, num-rounds, strategy")
    assert unknown_names("run-config key", ["lrr"], KEYS).startswith(
        "unknown run-config key 'lrr' (did you mean 'lr'?)"
    )
