"""spoc_xr: annotate satellite image time stacks without hand labelling.

Every stage is a plain function over xarray objects that stays lazy; the ``.spoc`` accessor
(registered on import) and the ``spoc-xr`` command line are thin wrappers over them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from spoc_xr import accessor as _accessor  # noqa: F401  (registers the .spoc accessor)
from spoc_xr.detect import DetectParams
from spoc_xr.errors import SpocError
from spoc_xr.evaluate import evaluate
from spoc_xr.export import export_chips
from spoc_xr.ingest import ingest, open_geotiffs, open_stack
from spoc_xr.objects import object_table, write_objects
from spoc_xr.pipeline import annotate, annotate_store
from spoc_xr.store import open_store, write_dataset
from spoc_xr.synthetic import make_harbour, read_truth

__all__ = [
    "DetectParams",
    "SpocError",
    "__version__",
    "annotate",
    "annotate_store",
    "evaluate",
    "export_chips",
    "ingest",
    "make_harbour",
    "object_table",
    "open_geotiffs",
    "open_stack",
    "open_store",
    "read_truth",
    "write_dataset",
    "write_objects",
]
