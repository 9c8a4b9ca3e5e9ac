"""A short, cheap hash that identifies a UNet's base weights (written into edit metadata).

Hashing every byte of a 5 GB SDXL UNet would take seconds; instead every tensor contributes its LDM
name, its shape and an evenly strided sample of its values. Names are LDM keys and values are hashed
as fp16, so the same base model gives the same fingerprint in the diffusers and ComfyUI backends and
whether it was loaded in fp32, fp16 or bf16-from-fp32 files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

SAMPLES_PER_TENSOR = 64


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], *, length: int = 16) -> str:
    """sha256 over (LDM name, shape, strided value sample) of every tensor, as ``length`` hex digits.

    Args:
        named_tensors: ``(ldm_key, tensor)`` pairs, e.g. ``input_blocks.1.1.proj_in.weight``; any order.
        length: hex digits kept.
    """
    items = sorted(named_tensors, key=lambda kv: kv[0])
    digest = hashlib.sha256()
    samples = []
    for name, tensor in items:
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        samples.append(flat[::step][:SAMPLES_PER_TENSOR].to(torch.float16))
    if samples:  # one device->host copy for all tensors
        digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()[:length]
