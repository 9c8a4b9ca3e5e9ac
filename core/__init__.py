"""The engine: training methods on a small backend protocol. Never imports ComfyUI."""
