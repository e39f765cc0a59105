"""Host-wide Prometheus metrics: a collector any process registers (extra ``heksher_shm[prometheus]``).

.. code-block:: python

    import prometheus_client
    from heksher_shm.metrics import HeksherCollector

    prometheus_client.REGISTRY.register(HeksherCollector())

Each scrape reads the segments of the shared folder, so one scrape of any
worker describes the whole host: the leader, the freshness of the rules, the
updates, takeovers and declarations counted in the segment, the snapshot's
size and the attached processes. No process keeps a file of its own (unlike
``prometheus_client``'s multiprocess mode) and nothing is written on
``get()``. ``heksher-shm status --prometheus`` prints the same families in
the text format, for node_exporter's textfile collector. The metrics are
listed in the documentation's Metrics page.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as _error:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "heksher_shm.metrics needs prometheus_client: pip install 'heksher_shm[prometheus]' "
        "(or prometheus-client); heksher-shm status --prometheus prints the same figures without it"
    ) from _error

from heksher_shm._exposition import families, folder_family, read_folder
from heksher_shm._shm.folder import shm_dir_path
from heksher_shm.exceptions import SegmentError

__all__ = ["HeksherCollector"]

logger = logging.getLogger("heksher_shm.metrics")


class HeksherCollector(Collector):
    """Collects the ``heksher_shm_*`` metrics of every segment in a shared folder, label ``segment``.

    Args:
        shm_dir: the folder to read (default: ``HEKSHER_SHM_DIR``, else the
            default per-user folder), fixed when the collector is made. A
            folder that does not exist (yet) has no segments; a folder that
            cannot be used (another user's, a symbolic link...) is logged at
            each scrape and yields only ``heksher_shm_folder_usable 0`` (its
            processes serve without sharing): a scrape never fails for it.

    Register it once per process (``prometheus_client.REGISTRY.register(HeksherCollector())``);
    with several processes scraped, every one reports the same host-wide figures.
    """

    def __init__(self, shm_dir: str | os.PathLike[str] | None = None) -> None:
        self.shm_dir: Path = shm_dir_path(shm_dir)[0]
        """The folder this collector reads."""

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now (what ``prometheus_client`` calls at each scrape)."""
        problem: str | None = None
        try:
            readings = read_folder(self.shm_dir)
        except SegmentError as e:  # the folder: the message names it and why
            logger.warning("heksher_shm metrics: %s", e)
            readings, problem = [], str(e)
        for family in [folder_family(self.shm_dir, problem), *families(readings)]:
            metric: GaugeMetricFamily | CounterMetricFamily
            labels = sorted(family.samples[0][0]) if family.samples else []
            if family.type == "counter":
                metric = CounterMetricFamily(family.name, family.help, labels=labels)
            else:
                metric = GaugeMetricFamily(family.name, family.help, labels=labels)
            for sample_labels, value in family.samples:
                metric.add_metric([sample_labels[k] for k in labels], value)
            yield metric

    def describe(self) -> Iterator[Metric]:
        """Nothing: the families depend on what the folder holds, so registering reads nothing."""
        return iter(())
