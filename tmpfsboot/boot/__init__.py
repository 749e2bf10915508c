"""The boot engine: kernel command line -> plan -> fetch, verify, decompress, extract.

This package runs inside the initramfs on Debian's own python3.11 (started as
``python3.11 -I -S``). It imports the Python standard library and nothing else, not even
the rest of tmpfsboot; only relative imports within ``tmpfsboot.boot`` are allowed. The
host side (``tmpfsboot fetch``, ``tmpfsboot cmdline``) calls into it, never the reverse.
"""
