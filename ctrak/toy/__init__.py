"""The toy world: synthetic shape/colour datasets (`worlds`), the tiny model builder (`tiny`)
and the trainer of the shipped toy models (`train`); `DEFAULT_MODEL` is the shipped toy model
that the demo, `ctrak eval` and `ctrak generate` use by default."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "toy-paper"
