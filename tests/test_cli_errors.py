"""User mistakes on the command line: exit 2 and one line on stderr naming the field and the fix,
before anything compiles (no traceback). In-process: each case fails before any jit."""

import pytest

from nopejax import attention, cli

TINY = ("--config", "configs/tiny.py")


def one_line_error(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "typo.py"
    path.write_text("from nopejax.config import base_config\n\n\ndef get_config():\n"
                    "    cfg = base_config()\n    cfg.train.stepz = 5\n    return cfg\n")  # fmt: skip
    # train.steps=0 stops a config that slipped through at validate, before any work
    line = one_line_error(
        capsys, "train", "--config", str(path), "--workdir", str(tmp_path / "run"), "--config.train.steps=0"
    )
    assert "`train.stepz`" in line and "`train.steps`" in line
    assert not (tmp_path / "run").exists()


def test_override_without_value_suggests_the_flag(tmp_path, capsys):
    line = one_line_error(capsys, "train", *TINY, "--config.train.steps", "--workdir", str(tmp_path))
    assert "Fix: write --config.train.steps=VALUE." in line and "--config.--config" not in line
    line = one_line_error(capsys, "train", *TINY, "--config.train.steps", "5", "--workdir", str(tmp_path))
    assert "Fix: write --config.train.steps=5." in line


def test_workdir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    line = one_line_error(capsys, "train", *TINY, "--workdir", str(tmp_path / "f"))
    assert "--workdir" in line and "is a file" in line and "directory" in line


def test_export_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    line = one_line_error(capsys, "export", "--workdir", str(tmp_path), "--out", str(tmp_path / "f"))
    assert "--out" in line and "is a file" in line and "directory" in line


def test_config_json_of_a_run_is_accepted(tmp_path, capsys):
    import json

    from nopejax import config

    cfg = config.base_config()
    cfg.train.steps = 0  # invalid on purpose: proves the file was read, and stops before any work
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(cfg), config.HISTORY_KEY: []}))
    line = one_line_error(capsys, "train", "--config", str(tmp_path / "config.json"), "--workdir", str(tmp_path))
    assert "`train.steps`" in line and "positive" in line


def test_mesh_error_names_the_axis_set_and_the_cpu_flag(capsys):
    line = one_line_error(capsys, "train", *TINY, "--config.mesh.fsdp=3", "--dry-run")  # 8 test devices
    assert "config field `mesh.fsdp`" in line and "XLA_FLAGS=--xla_force_host_platform_device_count" in line


def test_pallas_with_short_zig_zag_chunks(capsys):
    line = one_line_error(capsys, "train", *TINY, "--config.model.attention_impl=pallas", "--config.model.head_dim=64",
                          "--config.mesh.context=4", "--config.train.seq_len=256", "--dry-run")  # fmt: skip
    assert "`train.seq_len`" in line and "= 32" in line and "attention_impl=auto" in line


@pytest.mark.parametrize(
    "platform, head_dim, chunk, impl",
    [("gpu", 256, None, "pallas"), ("gpu", 256, 128, "xla"), ("gpu", 128, 128, "cudnn"), ("tpu", 128, None, "pallas"),
     ("tpu", 128, 256, "pallas"), ("tpu", 128, 32, "xla"), ("tpu", 128, 192, "xla"), ("cpu", 128, 128, "xla")],
)  # fmt: skip
def test_auto_attention_picks_a_path_that_runs_under_context_parallelism(platform, head_dim, chunk, impl):
    assert attention.resolve_impl("auto", head_dim, platform, context_chunk=chunk) == impl


@pytest.mark.parametrize("platform, hint", [("cpu", True), ("gpu", False)])
def test_mesh_error_blames_the_axis_set_not_the_rest(platform, hint):
    from nopejax import config, sharding
    from nopejax.config import ConfigError

    cfg = config.base_config()
    cfg.mesh.tensor = 2
    with pytest.raises(ConfigError) as err:
        sharding.resolve_mesh_shape(cfg.mesh, 1, platform)
    assert err.value.field == "mesh.tensor" and "mesh.data = -1" in err.value.problem
    assert ("xla_force_host_platform_device_count" in err.value.fix) == hint
    assert sharding.resolve_mesh_shape(cfg.mesh, 8, platform)[0]["data"] == 4
