"""kombu and Celery against ferry-cloud's AMQP front: a kombu SimpleQueue round trip, then a
real Celery worker (a process of its own) runs tasks sent with .delay().

Usage: amqp_kombu_celery.py PORT WORKDIR. Prints OK as its last line when every check passed.
"""

import os
import subprocess
import sys
import time

import kombu

PORT = int(sys.argv[1])
WORKDIR = sys.argv[2]
URL = f"amqp://guest:guest@127.0.0.1:{PORT}//"


def simple_queue():
    with kombu.Connection(URL) as conn:
        q = conn.SimpleQueue("kombu-simple")
        for i in range(20):
            q.put({"n": i, "text": f"hello {i}"})
        got = []
        for _ in range(20):
            m = q.get(block=True, timeout=10)
            got.append(m.payload["n"])
            m.ack()
        assert got == list(range(20)), got
        q.close()


TASKS = '''
import os
from celery import Celery

app = Celery("ferrytasks", broker=os.environ["FERRY_BROKER"])
app.conf.broker_connection_retry_on_startup = True

@app.task
def add(x, y):
    with open(os.environ["FERRY_OUT"], "a") as f:
        f.write(f"{x + y}\\n")
    return x + y
'''


def celery_worker():
    os.makedirs(WORKDIR, exist_ok=True)
    with open(os.path.join(WORKDIR, "ferrytasks.py"), "w") as f:
        f.write(TASKS)
    out = os.path.join(WORKDIR, "results.txt")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, FERRY_BROKER=URL, FERRY_OUT=out, PYTHONPATH=WORKDIR)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "ferrytasks", "worker", "--pool=solo",
         "--concurrency=1", "--loglevel=WARNING", "--without-mingle", "--without-gossip"],
        cwd=WORKDIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        sys.path.insert(0, WORKDIR)
        os.environ.update(FERRY_BROKER=URL, FERRY_OUT=out)
        import ferrytasks
        for i in range(50):
            ferrytasks.add.delay(i, 1000)
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline:
            if os.path.exists(out):
                with open(out) as f:
                    lines = f.read().split()
                if len(lines) >= 50:
                    break
            if worker.poll() is not None:
                raise AssertionError("the worker died: " + worker.stdout.read().decode())
            time.sleep(0.1)
        assert sorted(int(x) for x in lines) == [i + 1000 for i in range(50)], lines
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()


simple_queue()
celery_worker()
print("OK")
