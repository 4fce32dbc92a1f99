"""Getting models: the catalog, pulls from the Hugging Face Hub (verified), the local registry.

``bitserve pull | models | rm`` and ``bitserve serve -hf`` are built from these parts:
:mod:`~bitserve.hub.catalog` (short names), :mod:`~bitserve.hub.spec` (what was asked for,
and which file answers it), :mod:`~bitserve.hub.pull` (download and verification with
``huggingface_hub``), :mod:`~bitserve.hub.session` (what its session is not trusted
with), :mod:`~bitserve.hub.registry` (what is on disk), :mod:`~bitserve.hub.errors` (one
sentence per failure).
"""

from bitserve.hub.catalog import Catalog, CatalogEntry
from bitserve.hub.errors import PullError
from bitserve.hub.pull import HubOptions, Puller
from bitserve.hub.registry import ModelRecord, Registry
from bitserve.hub.spec import ModelSpec, resolve

__all__ = [
    "Catalog",
    "CatalogEntry",
    "HubOptions",
    "ModelRecord",
    "ModelSpec",
    "PullError",
    "Puller",
    "Registry",
    "resolve",
]
