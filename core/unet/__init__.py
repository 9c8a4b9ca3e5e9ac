"""UNet layout knowledge shared by the backends and the edit readers: LDM <-> diffusers key maps
(``keymap``) and architecture detection / config inference (``layout``)."""
