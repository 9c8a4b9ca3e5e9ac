"""Test-only stub of ``torchvision.transforms``: importable, unusable (see the package docstring)."""


def __getattr__(name: str):
    raise AttributeError(
        f"torchvision.transforms.{name} is not available: this is Concept Guard's test stub of torchvision. "
        "Install the real torchvision to use code paths that need it."
    )
