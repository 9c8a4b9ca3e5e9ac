"""``python -m concept_guard``: same as the ``concept-guard`` command."""

from concept_guard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
