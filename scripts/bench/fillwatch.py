#!/usr/bin/env python3
"""Timeline of one pullcache fill, seen from its temp file (bench.sh only).

  fillwatch.py TMPDIR SIZE READYFILE TIMEOUT

pullcache downloads a blob into TMPDIR (<cache-dir>/tmp), hashing and writing
it as bytes arrive, then fsyncs it and renames it into blobs/.  Polling the
directory every few milliseconds gives, as epoch seconds on one line:

  seen full gone

  seen  the temp file first exists (the upstream answered)
  full  it has reached SIZE bytes (download + hash + write done)
  gone  it was renamed away (fsync and commit done)

"-" for a moment not observed.  READYFILE is created once polling has begun;
the watcher gives up after TIMEOUT seconds.  Diagnostic only: the timings are
as fine as the polling interval.
"""

import os
import sys
import time


def main():
    tmpdir, size, ready, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    seen = full = gone = None
    name = None
    deadline = time.time() + timeout
    open(ready, "w").close()
    while time.time() < deadline:
        now = time.time()
        try:
            names = os.listdir(tmpdir)
        except FileNotFoundError:
            names = []
        if name is None:
            if names:
                name, seen = names[0], now
        elif name not in names:
            gone = now
            break
        if name is not None and full is None:
            try:
                if os.stat(os.path.join(tmpdir, name)).st_size >= size:
                    full = now
            except FileNotFoundError:
                pass
        time.sleep(0.005)
    print(" ".join("-" if t is None else "%.3f" % t for t in (seen, full, gone)))


if __name__ == "__main__":
    main()
