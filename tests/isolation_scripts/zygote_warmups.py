"""Warm-ups for test zygotes (``zygote_warmups:start_thread``)."""

import threading
import time


def start_thread() -> None:
    """Leaves a thread running: a zygote must refuse to fork after this."""
    threading.Thread(target=time.sleep, args=(300,), daemon=True).start()
