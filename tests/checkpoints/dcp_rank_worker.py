"""One gloo rank of the DCP resharding tests: loads row-sharded DTensors and compares them.

Run by tests/checkpoints/test_checkpoint.py as `python dcp_rank_worker.py RANK WORLD INIT JOBS_JSON OUT`;
JOBS_JSON lists checkpoints and, per key, a .npy of the full tensor's bytes to compare against.
Kept apart from the test module so that each rank imports torch and nothing else.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor import empty as dtensor_empty


def main(rank: int, world: int, init: str, jobs_json: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for job in json.loads(jobs_json):
        entries = FileSystemReader(job["ckpt"]).read_metadata().state_dict_metadata
        state = {
            key: dtensor_empty(
                *entries[key].size, dtype=entries[key].properties.dtype, device_mesh=mesh, placements=[Shard(0)]
            )
            for key in job["keys"]
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=job["ckpt"])
        locals_ = {key: value.to_local() for key, value in state.items()}
        sizes = [None] * world
        dist.all_gather_object(sizes, {key: t.shape[0] for key, t in locals_.items()})
        for key, expected_path in job["keys"].items():
            expected = np.load(expected_path)
            per_rank = [s[key] for s in sizes]
            offset = sum(per_rank[:rank])
            local = locals_[key].contiguous().view(torch.uint8).numpy()
            full = state[key].full_tensor().contiguous().view(torch.uint8).numpy()
            row_bytes = expected.shape[1]
            result[f"{job['ckpt']}:{key}"] = {
                "sizes": per_rank,
                "local_equal": local.tobytes() == expected[offset : offset + per_rank[rank]].tobytes()
                and local.shape[1] == row_bytes,
                "full_equal": full.tobytes() == expected.tobytes(),
            }
    with open(out, "w") as handle:
        json.dump(result, handle)
    dist.barrier()  # no rank tears gloo down while a peer is still in a collective (an abort at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
