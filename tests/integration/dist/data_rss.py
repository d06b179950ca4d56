"""One data-parallel rank's reader over a shard directory: peak RSS, and resume = uninterrupted.

Iterates ``--batches`` micro-batches of ``TokenBatches`` (DP rank ``--rank`` of ``--dp``), hashing
those from ``--resume-at`` on; then starts a fresh reader at ``consumed_samples = resume_at x
micro_batch x dp`` (what Megatron records) and hashes as many. Prints one JSON line: the process's
peak RSS (``ru_maxrss``, KiB), both hashes and the sample ids read after the resume point.
"""

import argparse
import hashlib
import json
import resource

from acmoe_megatron.data.loader.batches import TokenBatches


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--resume-at", type=int, default=200)
    p.add_argument("--window", type=int, default=2**16)
    a = p.parse_args()
    kw = dict(micro_batch_size=a.mbs, dp_rank=a.rank, dp_size=a.dp, seed=11, verify_checksums=False,
              shuffle_window=a.window)

    def digest(batches, n):
        h = hashlib.sha256()
        for _ in range(n):
            batch = next(batches)
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                h.update(batch[key].numpy().tobytes())
        return h.hexdigest()

    through = TokenBatches(a.dir, "train", **kw)
    for _ in range(a.resume_at):
        next(through)
    ids = [through.sample_ids(k) for k in range(a.resume_at, a.batches)]
    uninterrupted = digest(through, a.batches - a.resume_at)
    resumed = TokenBatches(a.dir, "train", consumed_samples=a.resume_at * a.mbs * a.dp, **kw)
    after_resume = digest(resumed, a.batches - a.resume_at)
    print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "uninterrupted": uninterrupted, "resumed": after_resume, "ids": ids,
                      "samples": through.num_samples, "two_level": through._order.two_level}))


if __name__ == "__main__":
    main()
