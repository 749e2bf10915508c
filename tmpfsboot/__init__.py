"""tmpfsboot: boot disk-less Linux machines into a verified tmpfs root.

This package's top level must import nothing: ``tmpfsboot.boot`` is copied into the
initramfs together with this file alone.
"""

__version__ = "0.1.0"
