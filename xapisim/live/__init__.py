"""The live test bed: ``python -m xapisim --preset demo --live`` (root only).

Each simulated host becomes a network namespace with its AM, its bridge and its NIC; VMs flagged for a live guest
run a real process with a real NIC and an NBD disk; faults of ``/sim/`` act on them. ``bed.LiveBed`` builds and
follows the pool, ``reconcile`` decides what to do (pure), ``netns`` holds the namespace primitives (shared with the
AM tests), ``guest``/``guest_core`` are the guest program, ``disks`` a host's disk server.
"""
