"""What the VM tests share: the images a booted node fetches, its name, the boot timeout,
and the tmpfsboot lines of its console (tests/test_vm.py, tests/test_dracut.py)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tmpfsboot.host.demo import build_demo_root, build_layer
from tmpfsboot.host.image import build_image
from tmpfsboot.host.vm import BootResult, guest_url

HOSTNAME = "node7"
GUEST_MAC = "52-54-00-12-34-56"
TIMEOUT = 150.0


class Images:
    """A directory of images: base (busybox root with a nonce), common, host-HOSTNAME."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "images"
        self.dir.mkdir()
        self.nonce = secrets.token_hex(8)
        base = build_demo_root(root / "base", nonce=self.nonce)
        build_image(base, self.dir, "base")
        common = build_layer(root / "common", {
            "etc/tmpfsboot-demo/layers": "base\ncommon\n",
            "xattr-probe": "xattrs live here\n",
        })
        probe = common / "xattr-probe"
        os.setxattr(probe, "security.tmpfsboot", b"sec-ok")
        os.setxattr(probe, "trusted.tmpfsboot", b"trusted-ok")
        build_image(common, self.dir, "common")
        host = build_layer(root / HOSTNAME, {
            "etc/tmpfsboot-demo/layers": f"base\ncommon\nhost-{HOSTNAME}\n",
        })
        build_image(host, self.dir, f"host-{HOSTNAME}")
        # chosen by the NIC's MAC (QEMU's default for the first NIC) and the architecture
        node = build_layer(root / "node", {"etc/tmpfsboot-demo/node": "by mac and arch\n"})
        build_image(node, self.dir, f"node-amd64-{GUEST_MAC}")

    def root(self, *names: str) -> str:
        """root=... for the images NAMES, in order."""
        return ",".join(guest_url(f"{n}.tar.zst") for n in names)


def tmpfsboot_lines(result: BootResult) -> list[str]:
    return [line for line in result.console.splitlines() if line.startswith("tmpfsboot:")]
