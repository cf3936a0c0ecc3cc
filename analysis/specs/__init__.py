"""Model names ("specs") and the one door from a name to opened weights.

- :mod:`analysis.specs.names`: the grammar (``demo:``, ``upload:``, ``series:`` prefixes,
  the checks every name passes);
- :mod:`analysis.specs.resolver`: :class:`SpecResolver`, used by the command line, the
  dashboard and Ray workers alike;
- :mod:`analysis.specs.demo`, :mod:`analysis.specs.uploads`, :mod:`analysis.specs.series`:
  what the prefixed names refer to (the demo's manifest, stored uploads, checkpoint series).
"""

from analysis.specs.demo import DemoManifest, DemoModel, default_demo_root, demo_manifest
from analysis.specs.names import DEMO_PREFIX, MAX_SPEC_LENGTH, check_spec, local_paths_allowed
from analysis.specs.resolver import ResolvedSpec, SpecResolver, open_model
from analysis.specs.series import SERIES_PREFIX, Series, is_series_spec, resolve_series
from analysis.specs.uploads import UPLOAD_PREFIX, StoredUpload, UploadFolder, is_upload_spec

__all__ = [
    "DEMO_PREFIX",
    "MAX_SPEC_LENGTH",
    "SERIES_PREFIX",
    "UPLOAD_PREFIX",
    "DemoManifest",
    "DemoModel",
    "ResolvedSpec",
    "Series",
    "SpecResolver",
    "StoredUpload",
    "UploadFolder",
    "check_spec",
    "default_demo_root",
    "demo_manifest",
    "is_series_spec",
    "is_upload_spec",
    "local_paths_allowed",
    "open_model",
    "resolve_series",
]
