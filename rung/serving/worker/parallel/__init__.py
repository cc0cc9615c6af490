"""Tensor-parallel serving: one model split across N processes (GPUs, or CPU cores with gloo).

    sharding.py        which part of each weight a rank holds, read alone from the safetensors files
    group.py           the collectives the model's forward issues (all-reduce, vocabulary gather)
    shared_memory.py   the all-reduce between CPU ranks on one machine, through a mapped region
    workers.py         rank 0's side (rank 0 is the engine core, which keeps the scheduler and the KV manager):
                       starts ranks 1..N-1, sends each step's inputs, watches and stops them
    launch.py          starting them as processes on this machine (the default), and what any way must provide
    ray_ranks.py       the same ranks as Ray actors placed by a placement group (`--distributed-backend ray`)
    worker_process.py  a worker's side: join, load its shard, run every step it is sent
"""
