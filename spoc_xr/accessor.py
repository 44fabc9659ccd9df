"""The ``.spoc`` accessor: the library's functions as methods of stacks and annotations.

Importing this module registers ``DataArray.spoc`` (on a ``(time, band, y, x)`` stack) and
``Dataset.spoc`` (on the annotations that :func:`spoc_xr.pipeline.annotate` returns). The methods
only forward to the plain functions of :mod:`spoc_xr.pipeline` and :mod:`spoc_xr.plots`, so they
behave exactly as the CLI does, and they stay lazy where those functions are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure

__all__ = ["SpocAnnotationsAccessor", "SpocStackAccessor"]


@xr.register_dataarray_accessor("spoc")
class SpocStackAccessor:
    """``stack.spoc``: annotate a ``(time, band, y, x)`` stack and look at it.

    Examples
    --------
    >>> import spoc_xr.accessor  # registers .spoc (importing spoc_xr does it too)
    >>> stack = spoc_xr.open_stack("stack.zarr")  # doctest: +SKIP
    >>> annotations = stack.spoc.annotate(kernel=3)  # doctest: +SKIP
    >>> sorted(annotations.mask.dims)  # doctest: +SKIP
    ['time', 'x', 'y']
    """

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    def annotate(self, **kwargs: Any) -> xr.Dataset:
        """Lazy annotations of the stack; see :func:`spoc_xr.pipeline.annotate` for options.

        Parameters
        ----------
        **kwargs
            ``reference``, ``kernel``, ``threshold``, ``params`` as in
            :func:`spoc_xr.pipeline.annotate`.

        Returns
        -------
        xarray.Dataset
            ``mask``, ``valid``, ``heatmap``, ``reference``, ``water`` and per-date fractions,
            as Dask arrays (only a small overview has been read).

        Examples
        --------
        >>> annotations = stack.spoc.annotate(reference="median")  # doctest: +SKIP
        >>> annotations.mask.sel(time="2023-05-01").plot()  # doctest: +SKIP
        """
        from spoc_xr.pipeline import annotate

        return annotate(self._obj, **kwargs)

    def heatmap(self, **kwargs: Any) -> xr.DataArray:
        """Lazy ``(y, x)`` count of dates with a small object on water.

        Parameters
        ----------
        **kwargs
            Options of :meth:`annotate`.

        Returns
        -------
        xarray.DataArray
            uint16 heatmap (a Dask array: ``.compute()`` or ``.plot()`` it).

        Examples
        --------
        >>> stack.spoc.heatmap(kernel=7).plot.imshow()  # doctest: +SKIP
        """
        return self.annotate(**kwargs)["heatmap"]

    def quicklook(self, mask: xr.DataArray | xr.Dataset | None = None, **kwargs: Any) -> Figure:
        """RGB of chosen dates with an optional mask over it; see :func:`spoc_xr.plots.quicklook`.

        Parameters
        ----------
        mask : xarray.DataArray or xarray.Dataset, optional
            The ``mask`` cube, or the whole annotation Dataset.
        **kwargs
            ``dates``, ``bands``, ``percentiles``, ``ax``.

        Returns
        -------
        matplotlib.figure.Figure

        Examples
        --------
        >>> stack.spoc.quicklook(dates=["2023-03-01", "2023-03-11"])  # doctest: +SKIP
        """
        from spoc_xr.plots import quicklook

        if isinstance(mask, xr.Dataset):
            mask = mask["mask"]
        return quicklook(self._obj, mask, **kwargs)


@xr.register_dataset_accessor("spoc")
class SpocAnnotationsAccessor:
    """``annotations.spoc``: pictures and a report of an annotation Dataset.

    Examples
    --------
    >>> annotations = stack.spoc.annotate()  # doctest: +SKIP
    >>> annotations.spoc.heatmap_figure().savefig("heatmap.png")  # doctest: +SKIP
    """

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def quicklook(self, stack: xr.DataArray, **kwargs: Any) -> Figure:
        """The annotated ``stack`` with this mask over it; see :func:`spoc_xr.plots.quicklook`.

        Examples
        --------
        >>> annotations.spoc.quicklook(stack, dates=[0, 5])  # doctest: +SKIP
        """
        from spoc_xr.plots import quicklook

        return quicklook(stack, self._obj["mask"], **kwargs)

    def heatmap_figure(self, **kwargs: Any) -> Figure:
        """Heatmap over the reference with colour bar and scale bar.

        See :func:`spoc_xr.plots.heatmap_figure` for ``title``, ``cmap`` and ``ax``.

        Examples
        --------
        >>> annotations.spoc.heatmap_figure(cmap="viridis")  # doctest: +SKIP
        """
        from spoc_xr.plots import heatmap_figure

        kwargs.setdefault("water", self._obj.get("water"))
        return heatmap_figure(self._obj["heatmap"], self._obj["reference"], **kwargs)

    def counts_figure(self, **kwargs: Any) -> Figure:
        """Small objects per date and cloud cover; see :func:`spoc_xr.plots.counts_figure`.

        Examples
        --------
        >>> annotations.spoc.counts_figure()  # doctest: +SKIP
        """
        from spoc_xr.plots import counts_figure

        return counts_figure(self._obj, **kwargs)

    def report(self, stack: xr.DataArray, out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write the PNGs and ``report.html``; see :func:`spoc_xr.report.write_report`.

        Examples
        --------
        >>> annotations.spoc.report(stack, "run_report")  # doctest: +SKIP
        PosixPath('run_report/report.html')
        """
        from spoc_xr.report import write_report

        return write_report(self._obj, stack, out_dir, **kwargs)
