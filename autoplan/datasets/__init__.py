"""Raw datasets: the dataset.json contract, loading a dataset, and ``autoplan import``.

A dataset is ``RAW/NAME/`` with ``dataset.json`` and nnU-Net v2's layout:
``imagesTr/CASE_0000.ext`` (one file per channel; one RGB file counts as the
three channels R, G, B) and, for segmentation, ``labelsTr/CASE.ext``.
Classification datasets list their cases with class and optional group in
``dataset.json["cases"]``.

Modules: ``layout`` (Case, Dataset, load_dataset), ``importing`` (import_dataset), and the
steps of an import: ``sources`` (cases from publisher layouts), ``tables`` (CSVs of classes
and groups), ``inspection`` (reading and checking every case), ``writing`` (RAW/NAME).
"""

from autoplan.datasets.importing import KNOWN_CITATIONS, import_dataset, known_citation, parse_label_map  # noqa: F401
from autoplan.datasets.layout import Case, Dataset, load_dataset  # noqa: F401
