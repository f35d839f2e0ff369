"""Host networking for guests: TAP interfaces (`kvmpy.net.tap`) configured with pyroute2."""

from .tap import Tap, TapError, cleanup_stale_taps

__all__ = ["Tap", "TapError", "cleanup_stale_taps"]
