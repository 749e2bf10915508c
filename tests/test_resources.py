"""The fault matrix, resources and input: a tmpfs too small, bad rootsize=, unknown
substitutions, a host name that does not resolve; the CLI's exit codes and one-line
messages."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.archives import publish, snapshot
from support.faults import CLI, Root, Scene, fetch, run_cli
from support.faultserver import serve
from support.mounts import mounted_tmpfs
from support.reliability import Matrix

from tmpfsboot.boot.cmdline import NetFacts, parse_cmdline
from tmpfsboot.boot.errors import CmdlineError, SpaceError

pytestmark = pytest.mark.integration

IMAGE = "/img/root.tar.zst"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[int]:
    """A real tmpfs of SIZE on PATH; yields its free bytes."""
    with mounted_tmpfs(path, size=size):
        st = os.statvfs(path)
        yield st.f_bavail * st.f_frsize


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: the last stderr line, one line, no traceback."""
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tmpfsboot: error: "), proc.stderr
    return last


# -- space ---------------------------------------------------------------------------------


def test_root_fits_a_real_tmpfs(matrix: Matrix, good: Root, scene: Scene) -> None:
    matrix.case("Resources", "root on a real tmpfs with room (size=16m)", "survived")
    files: dict[str, bytes] = {}
    publish(files, "img", "root", good.image, unpacked_size=good.unpacked)
    with tmpfs(scene.target, "16m"), serve(files) as srv:
        fetch(srv.url + IMAGE[1:], scene, retries=0)
        assert snapshot(scene.target) == good.snapshot
    scene.assert_outside_untouched()
    matrix.evidence(f"manifest {good.unpacked} bytes <= free; 1 image request; tree equal")


def test_tmpfs_too_small_fails_before_download_with_both_sizes(matrix: Matrix, good: Root,
                                                               scene: Scene) -> None:
    matrix.case("Resources", "tmpfs too small, manifest declares the size (size=1m)",
                "refused")
    files: dict[str, bytes] = {}
    publish(files, "img", "root", good.image, unpacked_size=good.unpacked)
    with tmpfs(scene.target, "1m") as free, serve(files) as srv:
        with pytest.raises(SpaceError) as e:
            fetch(srv.url + IMAGE[1:], scene, retries=3)
        scene.assert_empty()
    message = str(e.value)
    assert f"needs {good.unpacked} bytes" in message and f"has {free} bytes" in message
    assert srv.count(IMAGE) == 0
    scene.assert_outside_untouched()
    matrix.evidence(f"0 image requests; `{message.replace(str(scene.target), 'DIR')}`")


def test_layers_that_fit_alone_but_not_together_fail_before_download(
        matrix: Matrix, good: Root, scene: Scene) -> None:
    matrix.case("Resources", "two layers, each fits, together too big (size=4m)", "refused")
    files: dict[str, bytes] = {}
    publish(files, "a", "root", good.image, unpacked_size=good.unpacked)
    publish(files, "b", "root", good.image, unpacked_size=good.unpacked)
    with tmpfs(scene.target, "4m") as free, serve(files) as srv:
        assert good.unpacked < free < 2 * good.unpacked
        with pytest.raises(SpaceError) as e:
            fetch(f"{srv.url}a/root.tar.zst,{srv.url}b/root.tar.zst", scene, retries=0)
    assert f"needs {2 * good.unpacked} bytes" in str(e.value)
    assert srv.count("/a/root.tar.zst") == srv.count("/b/root.tar.zst") == 0
    matrix.evidence(f"the sum of the manifests is checked: 0 image requests; needs "
                    f"{2 * good.unpacked}, has {free}")


@pytest.mark.parametrize("manifest", ["missing", "lies"])
def test_tmpfs_filling_up_during_extraction_fails_naming_the_member(
        matrix: Matrix, good: Root, scene: Scene, manifest: str) -> None:
    matrix.case("Resources", f"tmpfs too small (size=1m), manifest {manifest}", "refused")
    files: dict[str, bytes] = {}
    publish(files, "img", "root", good.image,
            unpacked_size=None if manifest == "missing" else 1000)
    with tmpfs(scene.target, "1m"), serve(files) as srv:
        with pytest.raises(SpaceError) as e:
            fetch(srv.url + IMAGE[1:], scene, retries=3)
        scene.assert_empty()
    message = str(e.value)
    assert "the root file system is full at tar member './usr/lib/blob.bin'" in message
    assert srv.count(IMAGE) == 1  # a full disk is not retried
    scene.assert_outside_untouched()
    matrix.evidence(f"1 image request, no retry, target emptied; `{message}`")


# -- input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["50x", "-1g", "0", "150%", "1.5g", "g"])
def test_invalid_rootsize_is_refused_naming_the_value(matrix: Matrix, size: str) -> None:
    matrix.case("Resources", f"`rootsize={size}`", "refused")
    with pytest.raises(CmdlineError) as e:
        parse_cmdline(f"root=http://127.0.0.1/x.tar.zst rootsize={size}")
    assert f"rootsize={size}" in str(e.value)
    proc = run_cli("cmdline", f"root=http://127.0.0.1/x.tar.zst rootsize={size}")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"rootsize={size}" in line
    matrix.evidence(f"`tmpfsboot cmdline` exit 2: `{line}`")


def test_unknown_substitution_is_refused_before_any_request(matrix: Matrix, good: Root,
                                                            scene: Scene) -> None:
    matrix.case("Resources", "unknown substitution `%bogus` in root=", "refused")
    with serve({}) as srv:
        proc = run_cli("fetch", f"{srv.url}%bogus/root.tar.zst", str(scene.target))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "unknown substitution %bogus" in line
    assert srv.hits == []
    matrix.evidence(f"exit 2, 0 requests: `{line.replace(srv.url, 'http://H/')}`")


def test_substitution_without_a_value_is_refused_before_any_request(
        matrix: Matrix, scene: Scene) -> None:
    matrix.case("Resources", "`%uuid` with no UUID known on the node", "refused")
    with serve({}) as srv:
        proc = run_cli("fetch", f"{srv.url}%uuid/root.tar.zst", str(scene.target))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "%uuid is unknown on this node" in line
    assert srv.hits == []
    matrix.evidence(f"exit 2, 0 requests: `{line.replace(srv.url, 'http://H/')}`")


def test_hostname_substitution_picks_the_nodes_image(matrix: Matrix, good: Root,
                                                     other: Root, scene: Scene) -> None:
    matrix.case("Resources", "`%hostname` in root= selects this node's image", "survived")
    files: dict[str, bytes] = {}
    publish(files, "node-a", "root", good.image)
    publish(files, "node-b", "root", other.image)
    with serve(files) as srv:
        fetch(f"{srv.url}%hostname/root.tar.zst", scene, facts=NetFacts(hostname="node-b"))
    assert snapshot(scene.target) == other.snapshot
    assert srv.count("/node-a/root.tar.zst") == 0
    matrix.evidence("hostname node-b: /node-b/ fetched, /node-a/ never asked")


def test_unresolvable_host_name_fails_naming_it(matrix: Matrix, scene: Scene,
                                                tmp_path: Path) -> None:
    matrix.case("Resources", "unresolvable host name `no-such-host.invalid` (retries=1)",
                "refused")
    # Only loopback: in a private mount namespace the resolver is 127.0.0.1, where no DNS
    # server listens, so the lookup fails at once and no query leaves the machine.
    resolv = tmp_path.parent / f"{tmp_path.name}.resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
    script = ('mount --bind "$1" /etc/resolv.conf && shift && exec "$@"')
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(resolv), str(CLI), "fetch",
         "--retries", "1", "--backoff", "0.01", "http://no-such-host.invalid/root.tar.zst",
         str(scene.target)], capture_output=True, text=True, timeout=60, check=False)
    resolv.unlink()
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert "http://no-such-host.invalid/SHA256SUMS: cannot resolve host name" in line
    assert "gave up after 1 retries" in line
    scene.assert_empty()
    scene.assert_outside_untouched()
    matrix.evidence(f"exit 1: `{line}`")


def test_cli_hash_mismatch_exits_1_with_one_line(matrix: Matrix, good: Root,
                                                 scene: Scene) -> None:
    matrix.case("Verification", "CLI: SHA256SUMS lists a wrong hash (--retries 0)", "refused")
    files: dict[str, bytes] = {}
    publish(files, "img", "root", good.image, sums_sha256="cd" * 32)
    with serve(files) as srv:
        proc = run_cli("fetch", "--retries", "0", srv.url + IMAGE[1:], str(scene.target))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert f"{srv.url}{IMAGE[1:]}: SHA-256 mismatch: expected {'cd' * 32}, got " in line
    scene.assert_empty()
    scene.assert_outside_untouched()
    matrix.evidence("exit 1, one line naming URL, expected and actual hash; target emptied")


@pytest.mark.parametrize(("root", "expect"), [
    ("ftp://127.0.0.1/root.tar", "only http:// and https:// URLs can be fetched"),
    ("http://127.0.0.1/a.tar.zst,,http://127.0.0.1/b.tar.zst", "empty layer"),
])
def test_cli_invalid_root_exits_2(matrix: Matrix, scene: Scene, root: str,
                                  expect: str) -> None:
    matrix.case("Resources", f"CLI: invalid ROOT `{root}`", "refused")
    proc = run_cli("fetch", root, str(scene.target))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert expect in line
    matrix.evidence(f"exit 2: `{line}`")


def test_cli_target_not_a_directory_exits_2(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Resources", "CLI: DIR is not a directory", "refused")
    missing = scene.target / "missing"
    with serve({}) as srv:
        proc = run_cli("fetch", srv.url + IMAGE[1:], str(missing))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"{missing}: not a directory" in line
    assert srv.hits == []
    matrix.evidence("exit 2, 0 requests: `tmpfsboot: error: DIR/missing: not a directory`")
