"""User-facing errors: one line that names the problem; the CLI prints it and exits with code 2."""


class KnowlensError(ValueError):
    """Bad input from a user (a file, a name, an option). Its message is one line and names the problem."""


class WorldSpecError(KnowlensError):
    """A world spec is malformed; the message names the field."""


class HookNameError(KnowlensError):
    """A hook name does not exist on the model; the message lists the closest valid names."""


class ModelLoadError(KnowlensError):
    """A model could not be loaded (unknown name, weights not fetchable offline, bad files)."""


class KnowlensWarning(UserWarning):
    """Something the user should know that does not stop the work (a redone shard, unknown words)."""
