"""Ids and idempotency keys that sort by creation, unique across threads and forked processes."""

from __future__ import annotations

import os
import re
import threading

from cycles.ids import new_id, new_key


def test_keys_are_32_hex_digits_in_creation_order_and_never_repeat():
    keys = [new_key() for _ in range(2000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)
    assert len(set(keys)) == len(keys)
    stamps = [k[:13] for k in keys]  # microseconds first: an index takes them at its end
    assert stamps == sorted(stamps)


def test_record_ids_keep_their_prefix_and_width():
    assert re.fullmatch(r"res_[0-9a-f]{25}", new_id("res_"))
    assert re.fullmatch(r"evt_[0-9a-f]{13}[0-9a-f]{2}", new_id("evt_", 8))


def test_threads_and_forked_children_draw_different_keys():
    seen: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [new_key() for _ in range(500)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 2000

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its generator was seeded again at the fork
        os.write(write, new_key()[13:].encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert child != new_key()[13:] and len(child) == 19
