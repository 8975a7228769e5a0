"""Process checkpoint/restore of engines with CRIU: warm restarts instead of cold starts.

- :mod:`.install`: CRIU 4.1.1 in a private root (``python -m albatross.checkpoint.install``);
- :mod:`.criu`: the criu binary as typed verbs (dump, restore, and their clean-ups);
- :mod:`.store`: one image directory per model and version, with metadata, owner-only
  permissions, a disk budget and optional S3 upload;
- :mod:`.restored`: a restored engine process, watched like a spawned one;
- :mod:`.engine`: checkpoint and restore of a supervised replica, with cold-start fallback.
"""
