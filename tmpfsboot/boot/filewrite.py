"""Finishing regular files: their data, owner, times; in a pool of threads where the
process may use more than one CPU.

The extractor creates every file itself, in archive order, in one thread: each change to
the namespace (create, replace, link, remove, whiteout) happens as it would in a serial
extraction, so every ordering guarantee holds as it is. The pool only finishes files it
was handed by descriptor: write the data, set owner and times, close. These system calls
release the GIL, so on a tmpfs (where a file's cost is kernel time) the pool's threads run
beside the parsing thread. What is in flight is bounded: at most `MAX_BYTES` of data and
`max_files` descriptors. A failure is raised in the extractor's thread at its next call,
naming the member; `close` always waits for every thread, so nothing writes into the
target after the extractor returned or failed.
"""

from __future__ import annotations

import os
import queue
import resource
import threading

MAX_BYTES = 64 << 20  # data in flight, copied out of the reader's buffer
MAX_THREADS = 8  # past this the threads only wait for the GIL
BATCH_FILES = 64  # handed over together: one wake-up of a thread per batch, not per file
BATCH_BYTES = 1 << 20
POOL_FILE_MAX = 256 << 10  # larger files are streamed by the extractor's own thread


class WriteFailed(Exception):
    """A pooled file could not be finished: NAME is its member, ERROR what went wrong."""

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


# fd, data, member name, chown, uid, gid, mode, mtime_ns
Job = tuple[int, bytearray, str, bool, int, int, int, int]


def cpus() -> int:
    """The CPUs this process may run on (taskset, cgroup cpusets), not the machine's."""
    return len(os.sched_getaffinity(0))


class WritePool:
    """THREADS threads finishing files handed over by `submit`."""

    def __init__(self, threads: int) -> None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_files = max(4, min(256, soft_limit // 4))  # each holds a descriptor
        self._batch_files = min(BATCH_FILES, self.max_files // 2)
        self._jobs: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._failed: list[WriteFailed] = []
        self._batch: list[Job] = []
        self._batch_bytes = 0
        self._files = self._bytes = 0  # handed over, not yet finished
        self._threads = [threading.Thread(target=self._work, name=f"tmpfsboot-write-{i}",
                                          daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def sized(cls, threads: int | None) -> WritePool | None:
        """A pool of THREADS threads (None: as many as the CPUs this process may use);
        None for no pool, as with one CPU, where the hand-overs would only cost."""
        if threads is None:
            threads = 0  # measured: threads lose to the GIL on small files (see commit)
        return cls(threads) if threads > 0 else None

    def submit(self, job: Job) -> None:
        """Hand over a created file with its data; waits while too much is in flight.
        Raises WriteFailed for any earlier job that failed."""
        batch = self._batch
        batch.append(job)
        self._batch_bytes += len(job[1])
        if len(batch) >= self._batch_files or self._batch_bytes >= BATCH_BYTES:
            self._flush()
            # room for the next batch: handed over plus batched stays within the limits
            while (self._files > self.max_files - self._batch_files
                   or self._bytes > MAX_BYTES - BATCH_BYTES - POOL_FILE_MAX):
                self._retire()
            if self._failed:
                raise self._failed[0]

    def drain(self) -> None:
        """Wait until every file handed over is finished; raises WriteFailed."""
        self._flush()
        while self._files:
            self._retire()
        if self._failed:
            raise self._failed[0]

    def close(self) -> None:
        """Stop the threads (files still queued are closed unfinished) and wait for them."""
        if not self._failed and (self._files or self._batch):
            self._failed.append(WriteFailed("", OSError("extraction stopped")))
        self._flush()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _flush(self) -> None:
        if self._batch:
            self._jobs.put(self._batch)
            self._files += len(self._batch)
            self._bytes += self._batch_bytes
            self._batch, self._batch_bytes = [], 0

    def _retire(self) -> None:
        files, size = self._done.get()
        self._files -= files
        self._bytes -= size

    def _work(self) -> None:
        get, done, failed = self._jobs.get, self._done.put, self._failed
        while (batch := get()) is not None:
            size = 0
            for fd, data, name, chown, uid, gid, mode, mtime_ns in batch:
                size += len(data)
                try:
                    if not failed:
                        written = os.write(fd, data) if data else 0
                        if written < len(data):  # a short write: rare on a tmpfs
                            write_all(fd, memoryview(data)[written:])
                        finish_file(fd, chown, uid, gid, mode, mtime_ns)
                except OSError as e:
                    failed.append(WriteFailed(name, e))
                except BaseException as e:  # raised again in the extractor's thread
                    failed.append(WriteFailed(name, OSError(str(e))))
                finally:
                    os.close(fd)
            done((len(batch), size))
