"""Which settings a rerun of a stage may change.

Every checkpoint of a stage records its resolved configuration (and `STAGE/config.yaml`
the latest run's). Rerunning a stage, to resume it or on a finished one, compares the new
configuration with the saved one, setting by setting (a setting is a field of the stage
config; a mapping such as `model.llm` or `data.mixture` is one setting):

* settings that only change how the stage runs may change: `log.*`, `checkpoint.*`,
  `mesh.*` (checkpoints reshard onto any mesh), `data.workers`, `data.strict`,
  `nan_policy`, `model.remat` and `model.attention`;
* every other one changes what the stage trains (steps, optimizer and schedule, data
  mixture, model, init, batch, loss) and is refused, with one line naming the setting and
  both values;
* `--extend` lets `steps` grow: the stage continues from its newest checkpoint and the
  learning-rate schedule is recomputed for the new step count.

Not compared: `init.path` of a stage that starts from the previous one (a folder of the
workdir, which may move), and settings the saved configuration lacks (written by an older
jaxmusic).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxmusic.train.config import ConfigError, StageConfig

FREE = ("log", "checkpoint", "mesh", "data.workers", "data.strict", "nan_policy", "model.remat", "model.attention")


def _settings(config, prefix: str = ""):
    for field in dataclasses.fields(config):
        value, key = getattr(config, field.name), prefix + field.name
        if dataclasses.is_dataclass(value):
            yield from _settings(value, key + ".")
        else:
            yield key, value


def _saved(saved: dict, key: str) -> tuple[bool, Any]:
    node = saved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(a, b) -> bool:
    # JSON text also equates NaNs (e.g. a NaN init scale), which `==` never does
    return a == b or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def changes(saved: dict, stage: StageConfig) -> list[tuple[str, Any, Any]]:
    """`[(setting, saved value, new value)]` of the settings that change what the stage trains."""
    out = []
    for key, value in _settings(stage):
        if any(key == free or key.startswith(free + ".") for free in FREE):
            continue
        if key == "init.path" and stage.init.source == "previous":
            continue
        found, old = _saved(saved, key)
        if found and not _same(old, value):
            out.append((key, old, value))
    return out


def check(saved: dict, stage: StageConfig, where: str, *, extend: bool = False) -> int | None:
    """The saved step count when `--extend` lets this rerun continue with more steps; None when
    nothing that matters changed; `ConfigError` otherwise. `where` names the saved run."""
    changed = changes(saved, stage)
    if not changed:
        return None
    listed = "; ".join(f"{key}: {json.dumps(old)} there, {json.dumps(new)} now" for key, old, new in changed)
    grows = [key for key, old, new in changed] == ["steps"] and changed[0][2] > changed[0][1]
    if extend and grows:
        return changed[0][1]
    if extend and [key for key, _, _ in changed] == ["steps"]:
        raise ConfigError(f"{where}: --extend only adds steps ({listed})")
    hint = f", or add --extend to continue it to {stage.steps} steps" if grows else ""
    raise ConfigError(f"{where} was trained with other settings ({listed}); rerun with the saved settings, "
                      f"or use another --workdir{hint}")
