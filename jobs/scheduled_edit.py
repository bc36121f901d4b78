"""``ray job submit`` / CronJob entrypoint for scheduled edits: one tick of a queue.

    ray job submit --address http://HEAD:8265 -- python jobs/scheduled_edit.py s3://bucket/queue

Same arguments as ``engram-ray tick`` (see ``engram_ray/schedule.py`` for the queue layout).
Safe on a timer: a tick that finds another at work exits 0 and says so.
"""

import sys

from engram_ray.cli import run

if __name__ == "__main__":
    run(["tick", *sys.argv[1:]])
