"""spoc_xr: annotate satellite image time stacks without hand labelling."""

from __future__ import annotations

__version__ = "0.1.0"
