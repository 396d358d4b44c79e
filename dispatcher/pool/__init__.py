"""The warm pool: bots of the current code made ahead of sessions, per region.

One mechanism for both machine backends (a `PoolBackend`: make a pool machine, start or resume
it, suspend it, retire it), in one of three POOL_MODEs (`stopped`, `suspended`, `running`); the
modes, their costs and recycling are in docs/operations.md, "The warm pool".

- `pool.py`: `Pool`, the claims (row updates in dispatcher/store/pool.py, safe across
  instances), the warming, and the replenisher that runs on the reconciler's leader.
- `machines.py`: what every part does to a pool machine and its row (retire, destroy).
- `recycle.py`: POOL_RECYCLE, a machine whose session ended returned with a new POOL_TOKEN.
- `repairs.py`: the reconciler's pass over the pool's rows and Fly's inventory.
"""

from dispatcher.pool.pool import Pool

__all__ = ["Pool"]
