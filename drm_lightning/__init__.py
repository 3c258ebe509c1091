"""drm_lightning: fine-tune per-task experts with Lightning, merge them (DRM, Iso-C/CTS, TSV-M, TIES, ...), validate."""

__version__ = "0.1.0"
