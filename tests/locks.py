"""Whether a lock is free, asked from another thread without waiting (no timing involved)."""

from __future__ import annotations

import threading


def lock_is_free_for_others(lock) -> bool:
    """Whether another thread could take ``lock`` now (non-blocking: no timing involved)."""
    result = []

    def probe():
        taken = lock.acquire(blocking=False)
        result.append(taken)
        if taken:
            lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0]
