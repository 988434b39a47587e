"""A module that starts a thread when imported: a zygote that loads it must not fork."""

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="imported-thread", daemon=True).start()
