"""matplotlib, loaded on the first drawing and never by ``import airvae``: it costs more than half a
second to import, and a researcher's training loop draws nothing."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only: airvae never opens a window)."""
    import matplotlib  # heavy: imported here, on first use, so that `import airvae` stays light

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
