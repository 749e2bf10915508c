"""Writing small files in worker processes, beside the parsing one, where the process may
use more than one CPU.

On a tmpfs a small file's cost is kernel time: open, write, set times, close. Threads
cannot share it out: each of those calls returns into a wait for the GIL the parsing
thread holds (measured: slower than no pool). Forked workers have a GIL each. The
extractor keeps every decision: it resolves the path (symlinks as if chrooted), owns the
namespace's order, and hands a worker only a new file at a path nothing else in flight
touches; before any member that could meet a file still in flight (the same path again,
a hard link, a whiteout, a directory not yet known) it waits for the workers (`sync`).
Jobs go down a pipe per worker in batches; what is in flight is bounded: at most
`MAX_BATCHES` unacknowledged batches of at most `BATCH_BYTES` (plus one file) each per
worker, under 20 MiB with the most workers; when every worker has that many, the extractor
writes the next batch itself. A worker's failure is raised in the extractor naming the
member; `close` always ends every worker, so nothing writes into the target after the
extraction returned or failed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct

PIPE_SIZE = 1 << 20
MAX_WORKERS = 8
POOL_FILE_MAX = 256 << 10  # larger files are streamed by the extractor itself
BATCH_FILES = 64  # one pipe write (and one worker wake-up) per batch
BATCH_BYTES = 512 << 10
MAX_BATCHES = 3  # per worker, sent and not acknowledged: more, and the extractor
# writes the batch itself (it is ahead of the workers: its CPU would idle otherwise)

# per job: path length, mode, uid, gid, chown, mtime_ns, data size (then path and data)
_JOB = struct.Struct("<HIIIBqI")
_BATCH = struct.Struct("<II")  # jobs in the batch, bytes after this header
_ACK = struct.Struct("<iI")  # errno (0: done) and which job of the batch failed
_IOV_MAX = 1020


class WriteFailed(Exception):
    """A worker could not write member NAME: ERROR says why."""

    def __init__(self, name: str, error: OSError) -> None:
        super().__init__(name, error)
        self.name, self.error = name, error


def finish_file(fd: int, chown: bool, uid: int, gid: int, mode: int, mtime_ns: int) -> None:
    """Owner (when CHOWN) and times of the file open at FD, its data written."""
    if chown:
        os.fchown(fd, uid, gid)
        if mode & 0o6000:
            os.fchmod(fd, mode)  # chown cleared the setuid and setgid bits
    if mtime_ns % 1_000_000_000:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    else:  # whole seconds (a .deb's files): cheaper to convert than nanoseconds
        seconds = mtime_ns // 1_000_000_000
        os.utime(fd, (seconds, seconds))


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """All of DATA to FD, through short writes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def cpus() -> int:
    """The CPUs this process may run on (taskset, cgroup cpusets), not the machine's."""
    return len(os.sched_getaffinity(0))


class WritePool:
    """WORKERS forked processes creating files under the directory open at ROOT_FD."""

    def __init__(self, workers: int, root_fd: int, create_flags: int) -> None:
        self._workers: list[tuple[int, int, int]] = []  # pid, jobs pipe, acks pipe
        self._sent: list[list[list[str]]] = [[] for _ in range(workers)]  # member names
        # of each batch sent to a worker and not acknowledged yet
        self._batch: list[bytes | bytearray | memoryview] = []
        self._names: list[str] = []
        self._batch_files = self._batch_bytes = 0
        self.failed: WriteFailed | None = None
        self._root_fd, self._create_flags = root_fd, create_flags
        try:
            for _ in range(workers):
                self._workers.append(_fork_worker(root_fd, create_flags))
        except OSError:
            self.close(ok=False)
            raise

    @classmethod
    def sized(cls, workers: int | None, root_fd: int, create_flags: int, *,
              busy: int = 1) -> WritePool | None:
        """A pool of WORKERS; by default one per CPU this process may use beyond the BUSY
        ones (the parser's, and the decompressor's when the stream comes from one).
        None for no pool, where there is no CPU to spare: a worker would only add copies
        (measured: a fetch on 2 CPUs is slower with one worker than with none)."""
        if workers is None:
            workers = min(cpus() - busy, MAX_WORKERS)
        return cls(workers, root_fd, create_flags) if workers > 0 else None

    @property
    def size(self) -> int:
        """How many worker processes there are."""
        return len(self._workers)

    def submit(self, rel: str, data: bytes | bytearray | memoryview, name: str, chown: bool,
               uid: int, gid: int, mode: int, mtime_ns: int) -> None:
        """Queue a new file at REL (relative to the root) with DATA and its metadata. DATA
        may be a view of a buffer the caller reuses: then it calls `flush` first."""
        path = rel.encode("utf-8", "surrogateescape")  # as os.fsencode, without its call
        self._batch += (_JOB.pack(len(path), mode, uid, gid, chown, mtime_ns, len(data)),
                        path, data)
        self._names.append(name)
        self._batch_files += 1
        self._batch_bytes += len(data)
        if self._batch_files >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            self.flush()

    def sync(self) -> None:
        """Wait until every file handed over is written; raises WriteFailed."""
        self.flush()
        for i, sent in enumerate(self._sent):
            while sent:
                self._acks(i, wait=True)
        if self.failed is not None:
            raise self.failed

    def close(self, *, ok: bool) -> None:
        """End the workers: after their queues when OK, at once (SIGKILL) otherwise."""
        for pid, jobs, acks in self._workers:
            with contextlib.suppress(OSError):
                os.close(jobs)
            if not ok:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(acks)
        self._workers = []

    def flush(self) -> None:
        """Hand the files queued so far to a worker (or write them here)."""
        if not self._batch_files:
            return
        sent = self._sent
        for i in range(len(sent)):
            self._acks(i, wait=False)
        i = min(range(len(sent)), key=lambda w: len(sent[w]))  # the least behind
        size = sum(len(part) for part in self._batch)
        if len(sent[i]) < MAX_BATCHES:
            parts = [_BATCH.pack(self._batch_files, size), *self._batch]
            for start in range(0, len(parts), _IOV_MAX):
                _writev_all(self._workers[i][1], parts[start : start + _IOV_MAX])
            sent[i].append(self._names)
        else:  # every worker is behind: this process writes the batch, as they would
            code, index = _write_jobs(b"".join(self._batch), self._batch_files,
                                      self._root_fd, self._create_flags)
            if code and self.failed is None:
                self.failed = WriteFailed(self._names[index], OSError(code, os.strerror(code)))
        self._batch, self._names, self._batch_files = [], [], 0
        self._batch_bytes = 0
        if self.failed is not None:
            raise self.failed

    def _acks(self, i: int, *, wait: bool) -> None:
        """Take worker I's acknowledgements: those there (at least one when WAIT)."""
        acks = self._workers[i][2]
        if wait:
            select.select([acks], [], [])
        try:
            data = os.read(acks, _ACK.size * 256)
        except BlockingIOError:
            return
        if not data or len(data) % _ACK.size:  # a worker died: its pipe closed
            names = self._sent[i][0] if self._sent[i] else [""]
            self._sent[i].clear()
            self.failed = self.failed or WriteFailed(names[0], OSError(errno.EPIPE,
                                                                       "a writer died"))
            return
        for code, index in _ACK.iter_unpack(data):
            names = self._sent[i].pop(0)
            if code and self.failed is None:
                self.failed = WriteFailed(names[index], OSError(code, os.strerror(code)))


def _writev_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> None:
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    if written < total:  # a signal or a full pipe cut it short: the rest, in one piece
        write_all(fd, memoryview(b"".join(parts))[written:])


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _fork_worker(root_fd: int, create_flags: int) -> tuple[int, int, int]:
    jobs_r, jobs_w = os.pipe2(os.O_CLOEXEC)
    acks_r, acks_w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(jobs_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    pid = os.fork()
    if pid == 0:  # the worker: nothing of the parent's runs here, it leaves by _exit
        code = 1
        try:
            # only its pipes and the root: a copy of any other descriptor (another
            # worker's pipe, the decompressor's, a socket) would keep it from ending
            _close_all_but(root_fd, jobs_r, acks_w)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _work(jobs_r, acks_w, root_fd, create_flags)
            code = 0
        finally:
            os._exit(code)
    os.close(jobs_r)
    os.close(acks_w)
    os.set_blocking(acks_r, False)
    return pid, jobs_w, acks_r


def _close_all_but(*keep: int) -> None:
    low = 3  # stdin, stdout and stderr stay
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _work(jobs: int, acks: int, root_fd: int, create_flags: int) -> None:
    """Write every batch read from JOBS; acknowledge each on ACKS (with the first error
    and the job that had it; the batches after an error are read and dropped)."""
    failed = False
    while len(head := _read_exact(jobs, _BATCH.size)) == _BATCH.size:
        count, size = _BATCH.unpack(head)
        batch = _read_exact(jobs, size)
        code, index = (0, 0) if failed else _write_jobs(batch, count, root_fd, create_flags)
        failed = failed or code != 0
        os.write(acks, _ACK.pack(code, index))


def _write_jobs(batch: bytes, count: int, root_fd: int, create_flags: int) -> tuple[int, int]:
    """Create and write the COUNT files of BATCH; (errno, job) of the first failure, which
    ends the batch, or (0, 0)."""
    pos = 0
    for index in range(count):
        rel_len, mode, uid, gid, chown, mtime_ns, size = _JOB.unpack_from(batch, pos)
        start = pos + _JOB.size
        pos = start + rel_len + size
        try:
            fd = os.open(batch[start : start + rel_len], create_flags, mode, dir_fd=root_fd)
            try:
                if size:
                    write_all(fd, memoryview(batch)[pos - size : pos])
                finish_file(fd, bool(chown), uid, gid, mode, mtime_ns)
            finally:
                os.close(fd)
        except OSError as e:
            return e.errno or errno.EIO, index
    return 0, 0
