"""Bot files the tests run unmodified under the bot runtime, beside the example bot.

- `EXAMPLE`: examples/bot/bot.py, the bot the image ships by default.
- `PIPECAT_STYLE`: written as Pipecat's 1.x examples are (`create_transport`, the verbatim
  example's imports, `load_dotenv(override=True)`, `logger.remove(0)` at import), with a
  pass-through pipeline that greets with a tone.
- `OWN_TRANSPORT`: builds `SmallWebRTCTransport` or `DailyTransport` from the runner arguments
  itself, with Pipecat's deprecated `PipelineTask`/`PipelineRunner`, and reads `body`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "bot" / "bot.py"
PIPECAT_STYLE = Path(__file__).resolve().parent / "pipecat_style" / "bot.py"
OWN_TRANSPORT = Path(__file__).resolve().parent / "own_transport" / "bot.py"


def example_module(name: str) -> ModuleType:
    """A module of the example bot's folder, imported under `example_<name>`."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
