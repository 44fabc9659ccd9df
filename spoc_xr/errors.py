"""One exception hierarchy for spoc_xr.

Every error a user can cause derives from :class:`SpocError`; messages name the offending file or
value and say what to change, so the CLI can print them as a single line.
"""

from __future__ import annotations


class SpocError(Exception):
    """Base class of every error spoc_xr raises on purpose."""


class SpocWarning(UserWarning):
    """Base class of spoc_xr's warnings (turned into errors under pytest)."""


class InputError(SpocError, ValueError):
    """The input files or stack cannot be used as they are."""


class NoInputFilesError(InputError):
    """A source folder holds no GeoTIFF."""


class CorruptFileError(InputError):
    """A GeoTIFF cannot be read completely."""


class GeoreferenceError(InputError):
    """A file lacks a CRS or transform, or dates do not share one grid."""


class BandMismatchError(InputError):
    """Band count, names or dtype differ between dates, or a dtype is unsupported."""


class DateParseError(InputError):
    """No date can be read from a file name."""


class DuplicateDateError(InputError):
    """Two files (or a file and the store) carry the same date and time."""


class NoDataError(InputError):
    """A date or the reference holds no valid pixel."""


class ParameterError(SpocError, ValueError):
    """A parameter value is out of its allowed range."""


class OutputError(SpocError):
    """The output path cannot be written as asked (exists, equals the input, escapes its folder)."""


class StoreError(SpocError):
    """A store is incomplete, incompatible or locked by another run."""


class MissingDependencyError(SpocError, ImportError):
    """An optional dependency is not installed."""
