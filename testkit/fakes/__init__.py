"""Emulators of the services the dispatcher and its bots call: Fly's Machines API (`fly/`),
Daily's REST API (`daily.py`) and daily-python (`daily_python/`, a stand-in put first on a bot's
PYTHONPATH), an offline bot image (`images/testbot/`), and a recorder of bot callbacks."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
DAILY_PYTHON = HERE / "daily_python"
TESTBOT_DIR = HERE / "images" / "testbot"
