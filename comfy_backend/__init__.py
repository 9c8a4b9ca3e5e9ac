"""The ComfyUI adapter: the backend protocol on ComfyUI's MODEL/CLIP/VAE (``backend``), host quirks
(``autograd``), memory policy (``memory``), trainable token vectors (``text``), model facts (``model_info``) and
edits as patches on a cloned MODEL (``patches``). Imported only inside ComfyUI."""
