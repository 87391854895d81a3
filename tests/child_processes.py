"""Running a function in a child process with a time limit (fork, spawn or forkserver)."""
import multiprocessing
import queue as queues
import time

CHILD_SECONDS = 120  # a child that has not answered by then hangs (a run takes well under a second)


def run_in_child(method, target, *args):
    """target(queue, *args) in a child started with `method`; returns what it put in the queue.
    Fails if the child does not answer within CHILD_SECONDS or exits with an error."""
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    child = context.Process(target=target, args=(queue, *args))
    child.start()
    deadline = time.monotonic() + CHILD_SECONDS
    try:
        while True:  # read before joining: a child blocks at exit until its queue is read
            try:
                result = queue.get(timeout=0.1)
                break
            except queues.Empty:
                assert child.is_alive(), f"the {method} child exited with code {child.exitcode} and no result"
                assert time.monotonic() < deadline, f"the {method} child hung for {CHILD_SECONDS} s"
        child.join(CHILD_SECONDS)
        assert child.exitcode == 0, f"the {method} child exited with code {child.exitcode}"
        return result
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def _run_session(queue, session, feeds):
    queue.put(session.run(None, feeds))


def run_session_in_forked_child(session, feeds):
    """session.run(None, feeds) in a forked child that inherits `session`; returns the outputs."""
    return run_in_child("fork", _run_session, session, feeds)
