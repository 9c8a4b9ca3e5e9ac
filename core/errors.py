"""One error family, so callers (CLI, nodes) can catch our errors and show them plainly."""


class ConceptGuardError(ValueError):
    """Base class of every error Concept Guard raises on bad input or a failed run."""


class ModelLoadError(ConceptGuardError):
    """A model folder or file is missing, incomplete, or of an unsupported architecture."""


class ArchitectureMismatchError(ConceptGuardError):
    """An edit or embedding was made for a different model architecture than the one loaded."""


class NoMatchingModulesError(ConceptGuardError):
    """A target pattern selected no UNet weights."""


class TrainingDivergedError(ConceptGuardError):
    """The loss became NaN or infinite; nothing was written."""


class OutputPathError(ConceptGuardError):
    """An output path is unsafe (path separators, traversal), exists already, or is not writable."""


class EditFileError(ConceptGuardError):
    """An edit file is unreadable, unsafe (a pickle with code in it), or holds no UNet edit."""
