"""The host side: library code for the admin's machine, not the initramfs.

Images (`image`, `fsimage`), the image server (`serve` and its parts), initramfs builds
(`initramfs`), QEMU boots (`vm`) and the demo (`demo`). Plain functions and classes with
typed arguments: no argparse, no exit codes (those are `tmpfsboot.cli`'s). It may import
`tmpfsboot.boot`, never the reverse.
"""
