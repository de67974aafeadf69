import glob
import os

import pytest

from config import ConfigError, TrainConfig, help_text, load_config
from tests.conftest import ROOT, run_python


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_file_parses(path):
    config = load_config([path])
    assert isinstance(config, TrainConfig)


def test_defaults_are_the_gpt2_124m_recipe():
    config = load_config([])
    assert (config.max_steps, config.warmup_steps, config.learning_rate, config.min_lr) == (19073, 715, 6e-4, 6e-5)
    assert (config.batch_size, config.block_size, config.total_batch_size, config.vocab_size) == (64, 1024, 2**19, 50304)
    assert load_config([os.path.join(ROOT, "configs", "gpt2_124m.py")]).n_layer == 12


def test_files_then_flags_left_to_right(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("batch_size = 8\nlearning_rate = 1e-3\n")
    b.write_text("import math\nbatch_size = 16\ntotal_batch_size = 2**14\n")
    config = load_config([str(a), str(b), "--learning_rate=3e-4", "--compile", "--max_steps=1e3"])
    assert (config.batch_size, config.learning_rate, config.total_batch_size) == (16, 3e-4, 16384)
    assert config.compile is True and config.max_steps == 1000


def test_flags_win_wherever_they_stand(tmp_path):
    """`--max_steps=10 configs/shakespeare.py` runs 10 steps: flags override every file, before or after it."""
    late = tmp_path / "late.py"
    late.write_text("max_steps = 300\nlearning_rate = 1e-2\n")
    shakespeare = os.path.join(ROOT, "configs", "shakespeare.py")
    config = load_config(["--max_steps=10", shakespeare, "--learning_rate=5e-4", str(late), "--max_steps=12"])
    assert (config.max_steps, config.learning_rate, config.n_layer) == (12, 5e-4, 4)  # the last flag, then files
    assert load_config(["--max_steps=10", shakespeare]).max_steps == 10
    assert "flags override them wherever they stand" in help_text()
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "override every config file wherever they stand" in " ".join(f.read().split())


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*'learning_rate'"):
        load_config(["--learning_rat=1e-3"])


def test_wrong_type_names_key_type_and_value(tmp_path):
    with pytest.raises(ConfigError, match="'batch_size'.*expects int.*'abc'"):
        load_config(["--batch_size=abc"])
    bad = tmp_path / "bad.py"
    bad.write_text("compile = 'yes please'\n")
    with pytest.raises(ConfigError, match="'compile'.*expects bool"):
        load_config([str(bad)])


def test_batch_size_takes_auto_from_flags_and_files(tmp_path):
    """batch_size is an int or the word auto (resolved before a run by gpt2_pretrain/auto_batch.py)."""
    assert load_config(["--batch_size=auto"]).batch_size == "auto"
    auto = tmp_path / "auto.py"
    auto.write_text("batch_size = 'auto'\nmemory_limit_gb = 40\n")
    assert (load_config([str(auto)]).batch_size, load_config([str(auto)]).memory_limit_gb) == ("auto", 40.0)
    assert load_config([str(auto), "--batch_size=8"]).batch_size == 8
    with pytest.raises(ConfigError, match="'batch_size'.*expects int or 'auto', got 'big'"):
        load_config(["--batch_size=big"])
    with pytest.raises(ConfigError, match="'memory_limit_gb' must be a finite number >= 0"):
        load_config(["--memory_limit_gb=-1"])
    assert "auto: the largest power of two that fits in memory" in help_text()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["configs/nope.py"])


def test_help_lists_every_key_with_its_comment():
    text = help_text()
    for key in ("n_layer", "total_batch_size", "wandb_mode", "data_dir"):
        assert f"--{key}=" in text
    assert "tokens per optimizer step" in text


# the first case stays in make test-fast: one check of train.py's error exit as a process; the others are slow
# (a Python process that imports torch: about 4 s each on the 2-core box)
@pytest.mark.parametrize("args, message", [
    (["configs/missing.py"], "config file 'configs/missing.py' not found"),
    pytest.param(["--batch_sise=8"], "Did you mean 'batch_size'", marks=pytest.mark.slow),
    pytest.param(["--max_steps=ten"], "expects int", marks=pytest.mark.slow),
])
def test_cli_errors_exit_nonzero_without_traceback(args, message):
    result = run_python(["train.py", *args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
