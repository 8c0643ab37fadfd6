"""The engine's own exception types."""


class UnsupportedModuleError(TypeError, ValueError):
    """The model (or one call of it) cannot be served: a module that mixes samples, a
    parameter used outside any module the engine sees, a fallback torch.func cannot run.
    The message names every offending module and parameter and says what to do. A
    TypeError (as before fallbacks existed) and a ValueError (as refusing BatchNorm in train
    mode was)."""
