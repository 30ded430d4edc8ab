"""``--audit FILE``: JSON lines, one per committed step, naming the global samples it consumed.

``{"step": s, "epoch": e, "start": a, "stop": b, "view": v, "members": [...]}``: positions
``[a, b)`` of epoch ``e``'s sample order (:mod:`mpirt.train.order`). Over a finished run every
position of every epoch appears exactly once, whatever failed. Only the coordinator writes; a new
coordinator first fills in steps its predecessor committed but did not get to log (they are
known from the step number alone) and marks them ``"recovered": true``.
"""

import json
import os

from mpirt.atomic import atomic_path


class Audit:
    def __init__(self, path, schedule):
        self.path, self.schedule = path, schedule
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self._fd = None

    def records(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, step):
        """Keep only steps before ``step`` (a resumed run redoes what came after its checkpoint)."""
        kept = [r for r in self.records() if r["step"] < step]
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        self._next = kept[-1]["step"] + 1 if kept else 0

    def write(self, step, **fields):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        lines = [self._line(s, recovered=True) for s in range(self._next, step)]
        lines.append(self._line(step, **fields))
        os.write(self._fd, "".join(lines).encode())
        self._next = step + 1

    def _line(self, step, **fields):
        epoch, start, stop = self.schedule.locate(step)
        return json.dumps({"step": step, "epoch": epoch, "start": start, "stop": stop, **fields},
                          sort_keys=True) + "\n"

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
