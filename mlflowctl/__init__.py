"""mlflowctl: one command from raw data to a tested, monitored model endpoint."""
import pluggy

__version__ = "0.1.0"

#: Decorate plugin functions with this to implement a hook of :mod:`mlflowctl.hookspecs`.
hookimpl = pluggy.HookimplMarker("mlflowctl")

__all__ = ["hookimpl", "__version__"]
