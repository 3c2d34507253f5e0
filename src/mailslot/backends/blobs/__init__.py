"""Blob store backends: a local directory (embedded default) and S3-compatible object stores."""
