"""The handler behind `examples/web_front.py`: turns a URL's query into a result.

Q-Oper8's web example sent the parsed query string to a child and showed what came back; this
handler gives back something visibly computed in the child (the query with its keys
uppercased) together with the child's own pid, so a page can show that the pid the master
reports and the process that did the work are the same one. Stdlib only, like any handler
that should start fast.

| action                     | what happens                                                 |
|----------------------------|--------------------------------------------------------------|
| `{"a": "1", "b": "2"}`     | returns `{"upper": {"A": "1", "B": "2"}, "pid": <worker pid>}` |
| `{"fail": "why", ...}`     | raises `ValueError("why")`: the action ends `handler_error`  |
| `{"sleep": "2", ...}`      | prints `sleeping 2.0 s`, blocks that long, then returns as above |
"""

from __future__ import annotations

import os
import time
from typing import Any

#: The longest `sleep` honoured, so one URL cannot hold a worker for ever.
MAX_SLEEP = 30.0


def handle(action: dict[str, Any]) -> dict[str, Any]:
    """Uppercase the query's keys; fail or block first when the query asks for it.

    `fail` and `sleep` exist so the web front's behaviour can be seen (and tested) with
    plain URLs: `/test/?fail=boom` shows the error page, and `/test/?sleep=5` holds one
    worker while other requests are still answered at once. The `sleeping` line goes to the
    master's logs (a worker's stdout is captured), where a test can wait for it.
    """
    if "fail" in action:
        raise ValueError(str(action["fail"]) or "asked to fail")
    if "sleep" in action:
        seconds = min(float(action["sleep"]), MAX_SLEEP)
        print(f"sleeping {seconds} s", flush=True)
        time.sleep(seconds)
    return {"upper": {str(key).upper(): value for key, value in action.items()}, "pid": os.getpid()}
