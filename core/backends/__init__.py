"""Implementations of :class:`concept_guard.core.backend.DiffusionBackend` (diffusers; ComfyUI lives in nodes/)."""
