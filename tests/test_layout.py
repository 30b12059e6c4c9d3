"""House rules that hold for the whole package: module boundaries, exit codes, installability."""

import ast
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _private_uses(path: Path) -> list[str]:
    """`from jaxmusic.x import _name` and `x._name` on an imported jaxmusic module."""
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxmusic"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)  # may be a submodule
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("jaxmusic")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    paths = [*(REPO / "jaxmusic").rglob("*.py"), *(REPO / "convert").glob("*.py"), *(REPO / "bench").glob("*.py")]
    assert [f for p in paths for f in _private_uses(p)] == []


USER_ERRORS = {  # command: (arguments, words of the one error line)
    "ask": (["-m", "jaxmusic.cli", "ask", "{tmp}/nope", "q"], "no such checkpoint folder"),
    "score": (["-m", "jaxmusic.cli", "score", "{tmp}/nope", "q", "--option", "a"], "no such checkpoint folder"),
    "eval": (["-m", "jaxmusic.cli", "eval", "{tmp}", "--benchmark", "{tmp}/b.jsonl"], "cannot read the benchmark"),
    "data": (["-m", "jaxmusic.cli", "data", "check", "{tmp}/m.jsonl", "--audio-root", "{tmp}"], "manifest not found"),
    "train": (["-m", "jaxmusic.cli", "train", "{tmp}/s.yaml", "--workdir", "{tmp}/w"], "config not found"),
    "demo": (["-m", "jaxmusic.cli", "demo", "--workdir", "{tmp}/d", "--minutes", "-1"], "--minutes must be > 0"),
    "hf_to_jax": ([str(REPO / "convert" / "hf_to_jax.py"), "--llm", "{tmp}/nope", "--out", "{tmp}/o"],
                  "no such folder"),
    "jax_to_hf": ([str(REPO / "convert" / "jax_to_hf.py"), "{tmp}/nope", "--out", "{tmp}/o"],
                  "not a jaxmusic checkpoint"),
}


@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_every_command_exits_2_on_a_user_error_with_one_line(command, tmp_path):
    args, words = USER_ERRORS[command]
    r = subprocess.run([sys.executable, *(a.replace("{tmp}", str(tmp_path)) for a in args)],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("WARNING")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


def test_a_non_editable_install_runs_outside_the_repo(tmp_path):
    """`pip install .` into a fresh environment (dependencies borrowed from this one, so nothing is
    downloaded), then `jaxmusic smoke` and the shipped configs, from a folder outside the repo."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = Path(subprocess.run([str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this environment's packages as plain path entries: its editable jaxmusic is not among them
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", str(REPO)], check=True, cwd=tmp_path, timeout=600)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([str(env_dir / "bin" / "jaxmusic"), "smoke", "--seconds", "2"], cwd=outside, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "smoke run ok" in r.stdout, r.stdout + r.stderr
    check = ("import jaxmusic, pathlib\n"
             "from jaxmusic.models.mufun import MuFunConfig\n"
             "from jaxmusic.demo import demo\n"
             "assert 'site-packages' in jaxmusic.__file__, jaxmusic.__file__\n"
             "assert MuFunConfig.from_yaml().fusion_layers == (0, 7, 15, 32)\n"
             "assert demo.DEFAULT_CONFIG.is_file()\n"
             "root = pathlib.Path(jaxmusic.__file__).parent / 'configs'\n"
             "assert (root / 'schedules' / 'mufun_full.yaml').is_file() and (root / 'stages' / 'demo.yaml').is_file()\n")
    r = subprocess.run([str(env_dir / "bin" / "python"), "-c", check], cwd=outside, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_compiled_step_names_the_blocks_for_profiles():
    """Profiles and HLO dumps say where time goes: ops carry the blocks' `jax.named_scope`s."""
    import jax
    from flax import nnx

    from jaxmusic.losses import cross_entropy
    from jaxmusic.train import config as C
    from jaxmusic.train.state import ModelSpec
    from jaxmusic.train.synthetic import SyntheticSource

    stage = C.load(REPO / "configs" / "stages" / "tiny.yaml").stages[0]
    spec = ModelSpec.from_stage(stage)
    graphdef, state = nnx.split(spec.build(nnx.Rngs(0)))
    source = SyntheticSource(vocab_size=spec.llm.vocab_size, n_mels=spec.whisper.num_mel_bins,
                             frames=2 * spec.whisper.max_source_positions, tokens_per_chunk=spec.tokens_per_chunk,
                             seq_len=stage.data.seq_len, chunks_per_row=stage.data.chunks_per_row, global_rows=2,
                             rows=slice(0, 2))
    batch = next(source)
    grad = jax.jit(jax.grad(lambda st, b: cross_entropy(nnx.merge(graphdef, st), b)[0]))
    text = grad.lower(state, batch).compile().as_text()
    for scope in ("conv_stem", "encoder_layer/attention", "encoder_layer/mlp", "final_norm", "fuse_pool",
                  "connector", "embed", "splice", "decoder_layer/attention", "decoder_layer/mlp", "lm_head",
                  "loss"):
        assert re.search(rf"[/(]{scope}[/)]", text), scope  # forward: .../scope/op, backward: jvp(scope)
