"""``ray job submit`` / CronJob entrypoint for scheduled edits: one tick of a queue.

    ray job submit --address http://HEAD:8265 -- python jobs/scheduled_edit.py s3://bucket/queue

Same arguments as ``engram-ray tick`` (see ``engram_ray/schedule.py`` for the queue layout).
Safe on a timer: a tick that finds another at work exits 0 and says so.
"""

import sys

from engram_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tick", *sys.argv[1:]]))
