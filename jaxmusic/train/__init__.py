"""Staged training of MuFun on sharded meshes (`jaxmusic train`); see `trainer` for the CLI."""

from jaxmusic.train.trainer import (EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR,  # noqa: F401
                                    main, run)
