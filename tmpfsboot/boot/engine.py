"""The boot engine: every layer of a root fetched, verified and extracted, in order.

One layer is one pipeline, all stages at once: a feeder thread reads the socket and
hashes each chunk on its way into the decompressor (a child program or the standard
library), and the calling thread extracts the tar stream from the decompressor's pipe.
The compressed image is never stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .compression import (
    MAGIC_SIZE,
    PIPE_SIZE,
    ChildDecompressor,
    Compression,
    InProcessDecompressor,
    start_decompressor,
)
from .contract import (
    SIGNATURE_SUFFIX,
    SUMS_NAME,
    manifest_name,
    parse_unpacked_size,
)
from .errors import (
    ArchiveError,
    FetchError,
    PermanentHTTPError,
    RestartRoot,
    SpaceError,
    TmpfsbootError,
    UnsafeMemberError,
    UsageError,
    VerificationError,
)
from .extract import Extractor, ExtractStats
from .fetch import (
    Download,
    DownloadResult,
    RetryBudget,
    fetch_bytes,
    image_name,
    sibling_urls,
)
from .imagelayer import (
    ImageStack,
    LayerKind,
    probe_kinds,
)
from .log import NO_EVENTS, EventLog, format_bytes, phase
from .policy import FetchPolicy, Verify

log = logging.getLogger("tmpfsboot")



@dataclass(frozen=True)
class LayerSource:
    """A layer ready to fetch: its resolved mirror URLs and what is known before download."""

    number: int
    urls: tuple[str, ...]
    sha256: str | None
    unpacked_size: int | None
    kind: LayerKind = LayerKind.TAR
    image_size: int | None = None  # an image layer's file: what it holds in RAM

    @property
    def ram_size(self) -> int | None:
        """What the layer needs in the tmpfs: its image file, or its unpacked tree."""
        return self.image_size if self.kind.is_image else self.unpacked_size


# SHA256SUMS already fetched (and its signature checked) in this attempt at the root,
# by the mirror URLs asked: layers in one directory share one SHA256SUMS.
SumsCache = dict[tuple[str, ...], tuple[bytes, str]]


@dataclass(frozen=True)
class _Run:
    """One call of fetch_root: its policy, the retry budget every download of the root
    draws from, and where it reports."""

    policy: FetchPolicy
    budget: RetryBudget
    events: EventLog


def _fetch_sums(run: _Run, sums_urls: list[str], number: int,
                cache: SumsCache) -> tuple[bytes, str]:
    """(SHA256SUMS, the URL it came from), its signature checked in signature mode."""
    from .verify import check_signature

    key = tuple(sums_urls)
    if key in cache:
        return cache[key]
    budget, timeout = run.budget, run.policy.timeout
    try:
        sums, sums_url = fetch_bytes(sums_urls, budget=budget, timeout=timeout,
                                     label=SUMS_NAME)
    except PermanentHTTPError as e:
        raise VerificationError(f"no {SUMS_NAME} for layer {number}: {e}") from e
    if run.policy.verify is Verify.SIGNATURE:
        keyring = run.policy.keyring
        assert keyring is not None
        try:
            signature, _ = fetch_bytes([sums_url + SIGNATURE_SUFFIX], budget=budget,
                                       timeout=timeout, label=SUMS_NAME + SIGNATURE_SUFFIX)
        except PermanentHTTPError as e:
            raise VerificationError(f"no signature for {sums_url}: {e}") from e
        check_signature(sums, signature, keyring=keyring, what=sums_url)
        log.info("%s: good signature (keyring %s)", sums_url, keyring)
    cache[key] = (sums, sums_url)
    return sums, sums_url


def _expected_sha256(run: _Run, number: int, urls: list[str],
                     cache: SumsCache) -> str | None:
    """The layer's hash from the SHA256SUMS beside the first mirror that answers and
    lists its image; None when nothing is verified."""
    from .verify import expected_hash

    candidates = list(urls)
    while run.policy.verify is not Verify.NO:
        sums_urls = sibling_urls(candidates, SUMS_NAME)
        sums, sums_url = _fetch_sums(run, sums_urls, number, cache)
        image_url = candidates[sums_urls.index(sums_url)] if sums_url in sums_urls else urls[0]
        try:
            return expected_hash(sums.decode("utf-8", "replace"), image_name(image_url),
                                 sums_url=sums_url)
        except VerificationError:
            candidates.remove(image_url)
            if not candidates:
                raise
    return None


def _unpacked_size(run: _Run, number: int, urls: list[str]) -> int | None:
    """The layer's unpacked size from its manifest; None without preflight or manifest."""
    if not run.policy.preflight:
        return None
    manifest_urls = sibling_urls(urls, manifest_name(image_name(urls[0])))
    try:
        data, _ = fetch_bytes(manifest_urls, budget=run.budget, timeout=run.policy.timeout,
                              label="manifest")
        return parse_unpacked_size(data)
    except PermanentHTTPError:
        return None  # no manifest: no preflight for this layer
    except ValueError:
        log.warning("layer %d: ignoring a manifest that is not valid JSON", number)
        return None


def _fetch_metadata(run: _Run, number: int, urls: list[str], cache: SumsCache) -> LayerSource:
    """SHA256SUMS (and its signature) and the manifest of one layer."""
    sha256 = _expected_sha256(run, number, urls, cache)
    return LayerSource(number=number, urls=tuple(urls), sha256=sha256,
                       unpacked_size=_unpacked_size(run, number, urls))


def check_space(sources: list[LayerSource], target: str) -> None:
    """SpaceError, before any download, if the layers need more than TARGET holds: tar
    layers' unpacked sizes (from their manifests) plus image layers' files."""
    sizes = [s.ram_size for s in sources if s.ram_size is not None]
    if not sizes:
        return
    st = os.statvfs(target)
    free = st.f_bavail * st.f_frsize
    need = sum(sizes)
    if need > free:
        raise SpaceError(
            f"the root needs {need} bytes ({format_bytes(need)}: image files and unpacked "
            "tar layers) "
            f"but {target} has {free} bytes ({format_bytes(free)}) free; "
            "raise rootsize= or boot a smaller image"
        )


class _Abort(Exception):
    """The extractor is gone and nothing needs the rest of the download."""


class _LayerPipe:
    """Download -> sha256 -> decompressor -> pipe, fed from a thread."""

    def __init__(self, source: LayerSource, out_w: int, *, budget: RetryBudget,
                 timeout: float, label: str) -> None:
        self.source = source
        self.out_w = out_w
        self.download = Download(list(source.urls), budget=budget, timeout=timeout,
                                 label=label)
        self.hasher = hashlib.sha256()
        self.head = bytearray()
        self.decompressor: ChildDecompressor | InProcessDecompressor | None = None
        self.compression: Compression | None = None
        self.broken = False
        self.result: DownloadResult | None = None
        self.error: BaseException | None = None
        self.decompress_error: TmpfsbootError | None = None
        self.thread = threading.Thread(target=self._run, name="tmpfsboot-feeder", daemon=True)

    def _start(self) -> None:
        name = image_name(self.source.urls[0])
        self.compression = Compression.from_magic(bytes(self.head), name=name)
        dec = start_decompressor(self.compression, self.out_w)
        self.decompressor = dec
        if isinstance(dec, ChildDecompressor):
            os.close(self.out_w)  # the child holds the write end now
            self.out_w = -1
        head, self.head = bytes(self.head), bytearray()
        self._write(head)

    def _write(self, data: bytes | memoryview) -> None:
        try:
            assert self.decompressor is not None
            self.decompressor.write(data)
        except BrokenPipeError:
            self.broken = True

    def _sink(self, chunk: memoryview) -> None:
        self.hasher.update(chunk)
        if self.broken:
            if self.source.sha256 is None:
                raise _Abort()
            return  # keep hashing: is the image bad, or were its bytes?
        if self.decompressor is None:
            self.head += chunk
            if len(self.head) >= MAGIC_SIZE:
                self._start()
            return
        self._write(chunk)

    def _run(self) -> None:
        try:
            self.result = self.download.run(self._sink)
            if self.decompressor is None:
                self._start()  # a file smaller than MAGIC_SIZE
        except _Abort:
            pass
        except BaseException as e:  # handed to the extracting thread
            self.error = e
        finally:
            try:
                if self.decompressor is not None:
                    self.decompressor.close()
            except TmpfsbootError as e:
                self.decompress_error = e
            except BrokenPipeError:
                self.broken = True
            except BaseException as e:
                self.error = self.error or e
            finally:
                # the extractor sees the end of the stream, whatever happened here
                if self.out_w >= 0:
                    os.close(self.out_w)
                    self.out_w = -1


def _drain(fd: int) -> None:
    while os.read(fd, PIPE_SIZE):
        pass


def fetch_layer(source: LayerSource, extractor: Extractor, *, budget: RetryBudget,
                timeout: float, label: str) -> tuple[ExtractStats, DownloadResult, str]:
    """Stream one layer into the extractor; verify its hash once every byte went through.

    Returns what the extractor and the download did, and how the layer was decompressed
    (e.g. "zstd", "xz by pixz", "gzip by python").

    Raises VerificationError (a RestartRoot) when the bytes do not match SHA256SUMS,
    ArchiveError/UnsafeMemberError when the image itself is bad, FetchError when it
    could not be downloaded.
    """
    out_r, out_w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    pipe = _LayerPipe(source, out_w, budget=budget, timeout=timeout, label=label)
    pipe.thread.start()
    extract_error: TmpfsbootError | None = None
    stats = ExtractStats()
    try:
        stats = extractor.extract(out_r, label=label)
        _drain(out_r)  # trailing data (pixz's index): let the decompressor finish
    except TmpfsbootError as e:
        extract_error = e
    finally:
        os.close(out_r)  # an early close stops the decompressor with EPIPE
        pipe.thread.join()
    if pipe.error is not None:
        if isinstance(pipe.error, TmpfsbootError):
            raise pipe.error
        raise FetchError(f"{label}: {pipe.error}") from pipe.error
    error: TmpfsbootError | None = extract_error
    if pipe.decompress_error is not None and (
        extract_error is None or type(extract_error) is ArchiveError
    ):
        error = pipe.decompress_error
    actual = pipe.hasher.hexdigest()
    url = pipe.result.url if pipe.result else source.urls[0]
    if source.sha256 is not None and actual != source.sha256:
        raise VerificationError(
            f"{url}: SHA-256 mismatch: expected {source.sha256}, got {actual}"
        ) from error
    if error is not None:
        if isinstance(error, SpaceError | UnsafeMemberError):
            raise error
        raise ArchiveError(f"{url}: {error}") from error
    assert pipe.result is not None and pipe.compression is not None
    how = pipe.compression.value
    if pipe.compression is Compression.NONE:
        how = "uncompressed"
    elif pipe.decompressor is not None and pipe.decompressor.name != how:
        how += f" by {pipe.decompressor.name}"
    return stats, pipe.result, how


def fetch_root(
    layers: Sequence[Sequence[str]],
    target: str,
    policy: FetchPolicy,
    *,
    events: EventLog = NO_EVENTS,
    image_mounts: str | None = None,
) -> None:
    """Fetch, verify and extract every layer into TARGET, in order; later layers win.

    LAYERS are each layer's mirror URLs, resolved and in the order to try them
    (cmdline.resolve_layers). First each layer's SHA256SUMS (and signature) and manifest
    are fetched, the manifests' unpacked sizes checked against TARGET's free space, and
    the layers streamed in, as POLICY says. When a layer fails verification, or a resume
    is impossible, TARGET is emptied and the whole root fetched again while the policy's
    retries last. When the root fails for good, TARGET is emptied too: a half root is
    never left behind.

    Image layers (squashfs, erofs) are verified, then mounted under an overlay on TARGET
    with IMAGE_MOUNTS (where TARGET's tmpfs moves to hold them: see imagelayer), else
    stored as files in TARGET.
    """
    urls = [list(u) for u in layers]
    if not urls or not all(urls):
        raise UsageError("no layers to fetch")
    _check_target(target)
    run = _Run(policy, RetryBudget(policy.retries, policy.backoff, policy.wait), events)
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            _fetch_once(run, urls, target, ImageStack(target, image_mounts))
            break
        except RestartRoot as e:
            empty_directory(target)
            events.write("restart", attempt=attempt, error=str(e))
            try:
                run.budget.fail(e)
            except FetchError:
                raise e from None
        except BaseException:
            empty_directory(target)  # never a half root, whatever stopped it (a bug too)
            raise
    elapsed = time.monotonic() - started
    used = run.budget.used
    events.write("root", ok=True, layers=len(urls), seconds=round(elapsed, 3),
                 retries=used, attempts=attempt)
    log.info("root ready in %.2f s: %d layer(s), %d retries", elapsed, len(urls), used)


def _check_target(target: str) -> None:
    """UsageError unless TARGET is a directory other than / (a failed root is emptied)."""
    if not os.path.isdir(target):
        raise UsageError(f"{target}: not a directory")
    if os.path.realpath(target) == "/":
        raise UsageError(f"{target}: refusing to extract a root onto / itself")


def _fetch_once(run: _Run, urls: list[list[str]], target: str, images: ImageStack) -> None:
    budget, timeout = run.budget, run.policy.timeout
    with phase("Fetching checksums and manifests", run.events):
        cache: SumsCache = {}
        sources = [_fetch_metadata(run, i, u, cache) for i, u in enumerate(urls, 1)]
        kinds = probe_kinds([s.urls for s in sources], budget=budget, timeout=timeout)
        sources = [dataclasses.replace(s, kind=k, image_size=n)
                   for s, (k, n) in zip(sources, kinds, strict=True)]
    if run.policy.preflight:
        check_space(sources, target)
    try:
        _fetch_layers(run, sources, target, images)
    except BaseException:
        images.undo()  # unmounted and moved back: the caller empties TARGET
        raise


def _fetch_layers(run: _Run, sources: list[LayerSource], target: str,
                  images: ImageStack) -> None:
    budget, timeout, events = run.budget, run.policy.timeout, run.events
    total = len(sources)
    for source in sources:
        if source.kind.is_image:
            images.fetch(source.number, total, source.urls, sha256=source.sha256,
                         budget=budget, timeout=timeout, events=events)
    images.stack()
    # the parser, and the decompressor (or, for a plain tar, the thread feeding the
    # pipe) keep two CPUs busy: workers only where there are more
    extractor = Extractor(target, writers=run.policy.writers, busy_cpus=2)
    for source in sources:
        if source.kind.is_image:
            continue
        label = f"layer {source.number}/{total}"
        with phase(f"Fetching {label}: {' | '.join(source.urls)}", events,
                   layer=source.number) as figures:
            retries_before = budget.used
            stats, result, how = fetch_layer(source, extractor, budget=budget,
                                             timeout=timeout, label=label)
            figures.update(url=result.url, bytes=result.size, requests=result.requests,
                           retries=budget.used - retries_before, members=stats.members,
                           whiteouts=stats.whiteouts, writers=stats.writers,
                           unpacked_bytes=stats.bytes, verified=source.sha256 is not None,
                           compression=how, kind=source.kind.value)
            log.info("%s: %s in (%s), %d entries, %s unpacked%s%s", label,
                     format_bytes(result.size), how, stats.members, format_bytes(stats.bytes),
                     f", {stats.writers} writer processes" if stats.writers else "",
                     ", SHA-256 verified" if source.sha256 else "")


def empty_directory(path: str) -> None:
    """Remove everything inside PATH, keeping PATH itself (the tmpfs mount point)."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
