"""The README is the front door: it must list every setting."""

from __future__ import annotations

from pathlib import Path

from hueyserve.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    for name in Settings.model_fields:
        variable = "REDIS_URL" if name == "redis_url" else f"HUEYSERVE_{name.upper()}"
        assert f"| `{variable}` |" in README, f"{variable} is missing from the README"
