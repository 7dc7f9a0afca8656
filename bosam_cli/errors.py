"""User-facing errors: each carries one line that names the file and the field at fault."""


class BosamError(ValueError):
    """Bad input or a refused operation; the CLI prints the message and exits non-zero."""


class CheckpointError(BosamError):
    """A checkpoint that cannot be read or does not fit the model."""


class VolumeError(BosamError):
    """A CT or label volume that cannot be read or used."""


class PromptError(BosamError):
    """A prompt file that cannot be parsed or does not fit the volume."""


class EngineError(BosamError):
    """An engine that cannot be built, loaded or run here."""
