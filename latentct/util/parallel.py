"""An ordered map over worker processes with a progress bar (in-process when one worker is asked for)."""
from __future__ import annotations

import contextlib
import sys
from multiprocessing import get_context

from tqdm import tqdm


@contextlib.contextmanager
def worker_pool(workers: int):
    """A spawn pool of ``workers`` processes to share between several maps (None for in-process work).

    Starting workers costs an import of torch each, so one pool serves every pass of a stage.
    """
    if workers <= 1:
        yield None
        return
    with get_context("spawn").Pool(workers) as pool:
        yield pool


def pool_map(func, jobs: list, pool, desc: str, unit: str, chunksize: int = 1):
    """Yield ``func(job)`` for each job in order. ``func`` must be importable (a module-level function)."""
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, leave=False, file=sys.stderr)
    results = pool.imap(func, jobs, chunksize=chunksize) if pool is not None and len(jobs) > 1 else map(func, jobs)
    for result in results:
        bar.update()
        yield result
    bar.close()
