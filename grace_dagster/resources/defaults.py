"""The resources every entry point (UI, CLI, tests) starts from, configured from the environment."""

from __future__ import annotations

import os

from grace_dagster.resources.storage import Storage


def default_resources() -> dict[str, object]:
    return {
        "storage": Storage(
            data_dir=os.environ.get("GRACE_DATA_DIR", "data"),
            input_dir=os.environ.get("GRACE_INPUT_DIR") or None,
        ),
    }
