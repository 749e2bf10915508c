"""The fault matrix, HTTP and verification: a real server on 127.0.0.1 fails on purpose.

Each case either survives (the root is complete and equal to its source, after exactly
the requests the back-off policy implies) or is refused with a message naming the
cause, the target emptied and nothing written beside it.
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest
from support.archives import publish, snapshot
from support.faults import BACKOFF, Root, Scene, fetch
from support.faultserver import error, flip, ignore_range, reset, serve, short, stall, swap
from support.keys import GpgKey
from support.reliability import Matrix
from support.serve import free_port

from tmpfsboot.boot.errors import FetchError, PermanentHTTPError, VerificationError
from tmpfsboot.boot.policy import Verify

pytestmark = pytest.mark.integration

MIB = 1 << 20
IMAGE = "/img/root.tar.zst"
SUMS = "/img/SHA256SUMS"
MANIFEST = "/img/root.manifest.json"


def site(root: Root, directory: str = "img") -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    publish(files, directory, "root", root.image, unpacked_size=root.unpacked)
    return files


def assert_root_is(scene: Scene, root: Root) -> None:
    assert snapshot(scene.target) == root.snapshot
    scene.assert_outside_untouched()


def assert_backoff(waits: list[float], *, streaks: list[int]) -> None:
    """Each delay lies in [d, 4d] with d = BACKOFF * 2**streak."""
    assert len(waits) == len(streaks), waits
    for delay, k in zip(waits, streaks, strict=True):
        assert BACKOFF * 2**k <= delay <= 4 * BACKOFF * 2**k, (delay, k)


# -- HTTP --------------------------------------------------------------------------------


def test_clean_fetch_makes_one_request_per_file(matrix: Matrix, good: Root,
                                                scene: Scene) -> None:
    matrix.case("HTTP", "no fault (baseline)", "survived")
    with serve(site(good)) as srv:
        fetch(srv.url + IMAGE[1:], scene, retries=0)
    assert_root_is(scene, good)
    assert [srv.count(p) for p in (SUMS, MANIFEST, IMAGE)] == [1, 1, 1]
    assert scene.waits == []
    matrix.evidence("SHA256SUMS, manifest, image: 1 request each; tree equal to the source")


def test_503_with_retry_after_twice_then_200_waits_and_survives(matrix: Matrix, good: Root,
                                                                scene: Scene) -> None:
    matrix.case("HTTP", "503 + Retry-After: 1, twice, then 200", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, error(503, "1"), error(503, "1"))
        started = time.monotonic()
        fetch(srv.url + IMAGE[1:], scene, retries=2, sleep=True)
        elapsed = time.monotonic() - started
    assert_root_is(scene, good)
    assert [h.status for h in srv.requests_for(IMAGE)] == [503, 503, 200]
    assert 2.0 <= elapsed < 4.0  # Retry-After (x 1-1.5) rules, not the 0.01 s back-off
    matrix.evidence(f"3 image requests (503, 503, 200); slept {elapsed:.2f} s in all, "
                    "2 x Retry-After x 1-1.5")


def test_429_retry_after_sets_the_delay(matrix: Matrix, good: Root,
                                                   scene: Scene) -> None:
    matrix.case("HTTP", "429 + Retry-After: 7, then 200", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, error(429, "7"))
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    assert_root_is(scene, good)
    assert srv.count(IMAGE) == 2
    # Retry-After is the delay, stretched by up to half so a fleet does not return at once
    assert len(scene.waits) == 1 and 7.0 <= scene.waits[0] <= 10.5
    matrix.evidence(f"2 image requests; the engine waited {scene.waits[0]:.1f} s, in "
                    "[7, 10.5] (Retry-After x 1-1.5), not its 10-40 ms back-off")


def test_500_and_502_back_off_exponentially_with_jitter(matrix: Matrix, good: Root,
                                                        scene: Scene) -> None:
    matrix.case("HTTP", "500, then 502 (with Retry-After: 30, which 5xx other than 503 "
                "do not get), then 200", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, error(500), error(502, "30"))
        fetch(srv.url + IMAGE[1:], scene, retries=2)
    assert_root_is(scene, good)
    assert [h.status for h in srv.requests_for(IMAGE)] == [500, 502, 200]
    assert_backoff(scene.waits, streaks=[0, 1])
    matrix.evidence("3 image requests; delays " + ", ".join(f"{w * 1000:.0f} ms"
                                                           for w in scene.waits)
                    + f" within [d, 4d], d = {BACKOFF * 1000:.0f} ms x 2^k")


def test_transient_error_on_sha256sums_is_retried(matrix: Matrix, good: Root,
                                                  scene: Scene) -> None:
    matrix.case("HTTP", "503 on SHA256SUMS once", "survived")
    with serve(site(good)) as srv:
        srv.script(SUMS, error(503))
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    assert_root_is(scene, good)
    assert (srv.count(SUMS), srv.count(IMAGE)) == (2, 1)
    matrix.evidence("SHA256SUMS: 2 requests; image: 1")


def test_503_forever_gives_up_after_the_retry_budget(matrix: Matrix, good: Root,
                                                     scene: Scene) -> None:
    matrix.case("HTTP", "503 on every request, retries=2", "refused")
    with serve(site(good)) as srv:
        srv.script(IMAGE, *[error(503)] * 10)
        with pytest.raises(FetchError) as e:
            fetch(srv.url + IMAGE[1:], scene, retries=2)
    assert srv.count(IMAGE) == 3
    assert f"{srv.url}{IMAGE[1:]}: HTTP 503" in str(e.value)
    assert "gave up after 2 retries" in str(e.value)
    scene.assert_empty()
    scene.assert_outside_untouched()
    matrix.evidence(f"3 image requests; `{e.value}`".replace(srv.url, "http://H/"))


def test_reset_mid_body_resumes_with_range_at_the_offset(matrix: Matrix, good: Root,
                                                         scene: Scene) -> None:
    matrix.case("HTTP", "connection reset after 1 MiB of the image", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, reset(MIB))
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    assert_root_is(scene, good)
    first, second = srv.requests_for(IMAGE)
    assert first.range is None and first.sent == MIB
    assert second.range == f"bytes={MIB}-" and second.status == 206
    assert second.if_range is not None and second.if_range.startswith('"')
    assert second.sent == len(good.image) - MIB
    assert_backoff(scene.waits, streaks=[0])
    matrix.evidence(f"2 image requests; the 2nd `Range: bytes={MIB}-` + If-Range, "
                    f"answered 206 with the other {len(good.image) - MIB} bytes")


def test_stall_mid_body_times_out_and_resumes(matrix: Matrix, good: Root,
                                              scene: Scene) -> None:
    matrix.case("HTTP", "stall after 1 MiB for 3 s (timeout 1 s)", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, stall(MIB, 3.0))
        started = time.monotonic()
        fetch(srv.url + IMAGE[1:], scene, retries=1, timeout=1.0)
        elapsed = time.monotonic() - started
    assert_root_is(scene, good)
    assert [h.range for h in srv.requests_for(IMAGE)] == [None, f"bytes={MIB}-"]
    assert 1.0 <= elapsed < 3.0  # gave up on the stall after the timeout, not its end
    matrix.evidence(f"2 image requests, the 2nd `Range: bytes={MIB}-`; done in "
                    f"{elapsed:.1f} s (stall detected after the 1 s timeout)")


def test_stall_inside_the_first_read_keeps_the_bytes_received(matrix: Matrix, good: Root,
                                                              scene: Scene) -> None:
    matrix.case("HTTP", "stall after 700,000 bytes, twice (less than one 1 MiB read)",
                "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, stall(700_000, 3.0), stall(700_000, 3.0))
        fetch(srv.url + IMAGE[1:], scene, retries=2, timeout=1.0)
    assert_root_is(scene, good)
    # every byte that arrived before a stall counts: a link that stalls every 700 kB
    # still makes progress instead of starting again from byte 0 each time
    assert [h.range for h in srv.requests_for(IMAGE)] == [
        None, "bytes=700000-", "bytes=1400000-"]
    matrix.evidence("3 image requests: `Range: bytes=700000-`, then `bytes=1400000-`")


def test_short_body_resumes_at_the_exact_byte(matrix: Matrix, good: Root,
                                              scene: Scene) -> None:
    matrix.case("HTTP", "body ends cleanly 700,000 bytes in (short of Content-Length)",
                "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, short(700_000))
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    assert_root_is(scene, good)
    assert [h.range for h in srv.requests_for(IMAGE)] == [None, "bytes=700000-"]
    matrix.evidence("2 image requests, the 2nd `Range: bytes=700000-`")


def test_server_ignoring_range_is_read_from_zero_skipping_seen_bytes(
        matrix: Matrix, good: Root, scene: Scene) -> None:
    matrix.case("HTTP", "reset after 1 MiB, then the server ignores Range (200, whole file)",
                "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, reset(MIB), ignore_range())
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    assert_root_is(scene, good)
    second = srv.requests_for(IMAGE)[1]
    assert second.range == f"bytes={MIB}-" and second.status == 200
    assert second.sent == len(good.image)
    matrix.evidence("2 image requests; the 2nd asked Range, got 200 + the whole file; "
                    "the first 1 MiB skipped, tree equal")


def test_file_changed_under_a_resume_restarts_the_root(matrix: Matrix, good: Root,
                                                       other: Root, scene: Scene) -> None:
    matrix.case("HTTP", "reset after 1 MiB, then the mirror is updated (new ETag, new "
                "SHA256SUMS)", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, reset(MIB), swap(site(other)))
        fetch(srv.url + IMAGE[1:], scene, retries=2)
    assert_root_is(scene, other)  # the new image, never a mix of both
    hits = srv.requests_for(IMAGE)
    assert [h.range for h in hits] == [None, f"bytes={MIB}-", None]
    assert [h.status for h in hits] == [200, 200, 200]
    assert srv.count(SUMS) == 2  # the new image is checked against the new SHA256SUMS
    matrix.evidence("3 image requests: reset; If-Range no longer matches -> 200 with a new "
                    "ETag -> root restarted; from byte 0; SHA256SUMS fetched again; tree "
                    "equal to the new image")


def test_404_on_first_mirror_moves_on_without_a_retry(matrix: Matrix, good: Root,
                                                      scene: Scene) -> None:
    matrix.case("HTTP", "404 on mirror 1 of 2 (retries=0)", "survived")
    with serve(site(good, "m2")) as srv:
        fetch(f"{srv.url}m1/root.tar.zst|{srv.url}m2/root.tar.zst", scene, retries=0)
    assert_root_is(scene, good)
    assert [srv.count(p) for p in ("/m1/SHA256SUMS", "/m1/root.tar.zst",
                                   "/m2/SHA256SUMS", "/m2/root.tar.zst")] == [1, 1, 1, 1]
    matrix.evidence("mirror 1: SHA256SUMS and image 1 request each (404); mirror 2: 1 "
                    "each; no retry used")


def test_reset_on_first_mirror_resumes_on_the_second(matrix: Matrix, good: Root,
                                                     scene: Scene) -> None:
    matrix.case("HTTP", "mirror 1 resets after 1 MiB; mirror 2 has the same file",
                "survived")
    files = site(good, "m1")
    files.update(site(good, "m2"))
    with serve(files) as srv:
        srv.script("/m1/root.tar.zst", reset(MIB))
        fetch(f"{srv.url}m1/root.tar.zst|{srv.url}m2/root.tar.zst", scene, retries=1)
    assert_root_is(scene, good)
    assert srv.count("/m1/root.tar.zst") == 1
    assert [h.range for h in srv.requests_for("/m2/root.tar.zst")] == [f"bytes={MIB}-"]
    matrix.evidence(f"mirror 1: 1 request; mirror 2: 1 request `Range: bytes={MIB}-` (206)")


def test_404_on_every_mirror_fails_fast_naming_each_url(matrix: Matrix, good: Root,
                                                        scene: Scene) -> None:
    matrix.case("HTTP", "image 404 on both mirrors (SHA256SUMS present)", "refused")
    files = site(good, "m1")
    files.update(site(good, "m2"))
    del files["/m1/root.tar.zst"], files["/m2/root.tar.zst"]
    with serve(files) as srv, pytest.raises(PermanentHTTPError) as e:
        fetch(f"{srv.url}m1/root.tar.zst|{srv.url}m2/root.tar.zst", scene, retries=5)
    assert srv.count("/m1/root.tar.zst") == srv.count("/m2/root.tar.zst") == 1
    assert f"{srv.url}m1/root.tar.zst: HTTP 404" in str(e.value)
    assert f"{srv.url}m2/root.tar.zst: HTTP 404" in str(e.value)
    assert scene.waits == []
    scene.assert_empty()
    scene.assert_outside_untouched()
    matrix.evidence("1 request per mirror, no retry of 5 used; "
                    f"`{e.value}`".replace(srv.url, "http://H/"))


def test_connection_refused_is_retried_then_names_the_url(matrix: Matrix,
                                                          scene: Scene) -> None:
    matrix.case("HTTP", "nothing listens on the port (retries=1)", "refused")
    port = free_port()  # free: nothing listens on it
    url = f"http://127.0.0.1:{port}/img/root.tar.zst"
    with pytest.raises(FetchError) as e:
        fetch(url, scene, retries=1)
    assert "connection refused" in str(e.value) and "gave up after 1 retries" in str(e.value)
    assert len(scene.waits) == 1
    scene.assert_empty()
    scene.assert_outside_untouched()
    matrix.evidence(f"`{e.value}`".replace(f"127.0.0.1:{port}", "H"))


# -- Verification --------------------------------------------------------------------------


def test_bytes_flipped_in_transit_once_refetches_the_root(matrix: Matrix, good: Root,
                                                          scene: Scene) -> None:
    matrix.case("Verification", "bytes flipped in transit (first download only)", "survived")
    with serve(site(good)) as srv:
        srv.script(IMAGE, flip(1000, 2_000_000))
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    assert_root_is(scene, good)
    assert (srv.count(SUMS), srv.count(IMAGE)) == (2, 2)
    matrix.evidence("SHA-256 mismatch -> target emptied -> root fetched again: SHA256SUMS "
                    "and image 2 requests each; tree equal")


def test_layer_2_failing_verification_refetches_layer_1_too(matrix: Matrix, good: Root,
                                                            other: Root, scene: Scene) -> None:
    matrix.case("Verification", "2 layers: layer 2's bytes flipped once (layer 1 already "
                "extracted)", "survived")
    files = site(good, "l1")
    files.update(site(other, "l2"))
    with serve(files) as srv:
        srv.script("/l2/root.tar.zst", flip(1_500_000))
        fetch(f"{srv.url}l1/root.tar.zst,{srv.url}l2/root.tar.zst", scene, retries=1)
    # layer 2 overwrites every file of layer 1 (same paths): the tree is layer 2's
    assert snapshot(scene.target) == other.snapshot
    scene.assert_outside_untouched()
    assert (srv.count("/l1/root.tar.zst"), srv.count("/l2/root.tar.zst")) == (2, 2)
    matrix.evidence("target emptied, the root fetched again from layer 1: each layer's "
                    "image 2 requests; tree equal")


def test_layer_2_missing_empties_the_extracted_layer_1(matrix: Matrix, good: Root,
                                                       scene: Scene) -> None:
    matrix.case("HTTP", "2 layers: layer 2's image 404 after layer 1 was extracted",
                "refused")
    files = site(good, "l1")
    files.update(site(good, "l2"))
    del files["/l2/root.tar.zst"]
    with serve(files) as srv, pytest.raises(PermanentHTTPError) as e:
        fetch(f"{srv.url}l1/root.tar.zst,{srv.url}l2/root.tar.zst", scene, retries=2)
    assert (srv.count("/l1/root.tar.zst"), srv.count("/l2/root.tar.zst")) == (1, 1)
    scene.assert_empty()  # layer 1 had been extracted: a half root is never left
    scene.assert_outside_untouched()
    matrix.evidence("layer 1 extracted, then emptied; no retry for a 404; "
                    f"`{e.value}`".replace(srv.url, "http://H/"))


def test_bytes_flipped_every_time_fail_naming_url_and_hashes(matrix: Matrix, good: Root,
                                                             scene: Scene) -> None:
    matrix.case("Verification", "bytes flipped in transit on every download (retries=1)",
                "refused")
    with serve(site(good)) as srv:
        srv.script(IMAGE, flip(2_000_000), flip(2_000_000))
        with pytest.raises(VerificationError) as e:
            fetch(srv.url + IMAGE[1:], scene, retries=1)
    message = str(e.value)
    assert srv.count(IMAGE) == 2
    assert f"{srv.url}{IMAGE[1:]}: SHA-256 mismatch: expected {good_sha(good)}, got " in message
    assert message.split("got ")[1] != good_sha(good)
    scene.assert_empty()
    scene.assert_outside_untouched()
    matrix.evidence("2 image requests; target emptied; "
                    f"`{short_hashes(message).replace(srv.url, 'http://H/')}`")


def test_sha256sums_with_a_wrong_hash_empties_the_extracted_root(matrix: Matrix, good: Root,
                                                                 scene: Scene) -> None:
    matrix.case("Verification", "SHA256SUMS lists a wrong hash (retries=1)", "refused")
    files: dict[str, bytes] = {}
    publish(files, "img", "root", good.image, sums_sha256="ab" * 32)
    with serve(files) as srv, pytest.raises(VerificationError) as e:
        fetch(srv.url + IMAGE[1:], scene, retries=1)
    message = str(e.value)
    assert f"expected {'ab' * 32}, got {good_sha(good)}" in message
    assert srv.count(IMAGE) == 2
    scene.assert_empty()  # the whole image had been extracted before the hash was known
    scene.assert_outside_untouched()
    matrix.evidence("every byte extracted, then the hash differs: target emptied, 2 image "
                    f"requests; `{short_hashes(message).replace(srv.url, 'http://H/')}`")


def test_sha256sums_not_listing_the_image_refuses_before_download(
        matrix: Matrix, good: Root, scene: Scene) -> None:
    matrix.case("Verification", "SHA256SUMS does not list the image", "refused")
    files = site(good)
    files[SUMS] = b"0" * 64 + b"  other.tar.zst\n"
    with serve(files) as srv, pytest.raises(VerificationError) as e:
        fetch(srv.url + IMAGE[1:], scene, retries=0)
    assert str(e.value) == f"{srv.url}img/SHA256SUMS lists no hash for root.tar.zst"
    assert srv.count(IMAGE) == 0
    scene.assert_empty()
    matrix.evidence(f"0 image requests; `{e.value}`".replace(srv.url, "http://H/"))


def test_missing_sha256sums_refuses_before_download(matrix: Matrix, good: Root,
                                                    scene: Scene) -> None:
    matrix.case("Verification", "SHA256SUMS missing (404)", "refused")
    files = site(good)
    del files[SUMS]
    with serve(files) as srv, pytest.raises(VerificationError) as e:
        fetch(srv.url + IMAGE[1:], scene, retries=0)
    assert "no SHA256SUMS for layer 1" in str(e.value) and "HTTP 404" in str(e.value)
    assert srv.count(IMAGE) == 0
    scene.assert_empty()
    matrix.evidence(f"0 image requests; `{e.value}`".replace(srv.url, "http://H/"))


def signed_site(good: Root, key: GpgKey) -> dict[str, bytes]:
    files = site(good)
    files[SUMS + ".gpg"] = key.sign(files[SUMS])
    return files


def test_good_signature_survives(matrix: Matrix, good: Root, scene: Scene,
                                 gpg_key: GpgKey) -> None:
    matrix.case("Verification", "signature mode, SHA256SUMS.gpg good", "survived")
    with serve(signed_site(good, gpg_key)) as srv:
        fetch(srv.url + IMAGE[1:], scene, retries=0, verify=Verify.SIGNATURE,
              keyring=str(gpg_key.keyring))
    assert_root_is(scene, good)
    assert (srv.count(SUMS + ".gpg"), srv.count(IMAGE)) == (1, 1)
    matrix.evidence("gpgv accepted; 1 image request; tree equal")


def test_bad_signature_refuses_before_download(matrix: Matrix, good: Root, scene: Scene,
                                               gpg_key: GpgKey) -> None:
    matrix.case("Verification", "signature mode, SHA256SUMS.gpg signs other content",
                "refused")
    files = signed_site(good, gpg_key)
    files[SUMS + ".gpg"] = gpg_key.sign(b"something else\n")
    with serve(files) as srv, pytest.raises(VerificationError) as e:
        fetch(srv.url + IMAGE[1:], scene, retries=0, verify=Verify.SIGNATURE,
              keyring=str(gpg_key.keyring))
    assert str(e.value).startswith(f"{srv.url}img/SHA256SUMS: bad signature")
    assert srv.count(IMAGE) == 0
    scene.assert_empty()
    matrix.evidence("0 image requests; `" + str(e.value).replace(srv.url, "http://H/")
                    .split(" (")[0] + " (gpgv ...)`")


def test_missing_signature_refuses_before_download(matrix: Matrix, good: Root, scene: Scene,
                                                   gpg_key: GpgKey) -> None:
    matrix.case("Verification", "signature mode, SHA256SUMS.gpg missing (404)", "refused")
    with serve(site(good)) as srv, pytest.raises(VerificationError) as e:
        fetch(srv.url + IMAGE[1:], scene, retries=0, verify=Verify.SIGNATURE,
              keyring=str(gpg_key.keyring))
    assert str(e.value).startswith(f"no signature for {srv.url}img/SHA256SUMS")
    assert srv.count(IMAGE) == 0
    scene.assert_empty()
    matrix.evidence(f"0 image requests; `{e.value}`".replace(srv.url, "http://H/"))


def good_sha(root: Root) -> str:
    return hashlib.sha256(root.image).hexdigest()


def short_hashes(message: str) -> str:
    """MESSAGE with 64-digit hashes shortened for the table."""
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", message)
