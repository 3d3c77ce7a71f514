"""The on-disk artifact format and nothing else: save, load, read the manifest."""

from modelpress.artifact.load import decode_state_dict, load_artifact
from modelpress.artifact.manifest import is_artifact, read_manifest
from modelpress.artifact.save import save_artifact

__all__ = ["decode_state_dict", "is_artifact", "load_artifact", "read_manifest", "save_artifact"]
