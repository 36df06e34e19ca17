"""params.yaml parsing: profiles, DVC-style overrides, rejection of bad input before any work."""

import pytest
import yaml

from galip.cli import main
from galip.config import ConfigError, load_config


def test_profiles_resolve_from_the_repository_params():
    cc12m = load_config("params.yaml", profile="cc12m")
    assert (cc12m.model.clip_model, cc12m.model.clip_pretrained, cc12m.model.image_size) == ("ViT-B-32-quickgelu", "openai", 224)
    assert (cc12m.train.batch_size, cc12m.train.lr_g, cc12m.train.lr_d) == (64, 1e-4, 4e-4)
    assert (cc12m.train.beta1, cc12m.train.beta2) == (0.0, 0.9)
    demo = load_config("params.yaml", profile="demo")
    assert demo.model.clip_model == "galip-tiny" and demo.model.image_size == 64
    assert (demo.train.lr_g, demo.train.lr_d) == (2e-4, 8e-4)  # the demo sweep's choice
    assert demo.train.beta2 == cc12m.train.beta2  # the overlay only touches what it names


def test_dvc_style_overrides():
    cfg = load_config("params.yaml", ["train.lr_g=2e-4", "train.compile=true", "profile=cc12m"])
    assert cfg.train.lr_g == 2e-4 and cfg.train.compile is True and cfg.profile == "cc12m"
    cfg = load_config("params.yaml", ["train.batch_size=6"], profile="demo")
    assert cfg.train.batch_size == 6


def test_params_yaml_is_the_demo_preset_written_out():
    """The committed params.yaml is what `galip profile demo` writes: the preset and the file cannot drift."""
    from galip.config import profile_diff

    assert profile_diff("params.yaml") == ("demo", [])
    assert main(["profile", "--diff"]) == 0


def test_a_written_profile_is_complete_and_every_key_in_it_is_the_value_in_force(tmp_path):
    """params.yaml holds every key of its profile, so editing a key the profile sets (what `dvc exp run -S`
    does) changes the run: nothing shadows it."""
    import shutil

    from ruamel.yaml import YAML

    from galip.config import write_profile

    shutil.copytree("profiles", tmp_path / "profiles")
    params = tmp_path / "params.yaml"
    for name, key, preset_value in (("demo", "lr_g", 2e-4), ("cc12m", "lr_g", 1e-4)):
        write_profile(name, params, ["train.max_steps=5"])
        assert yaml.safe_load(params.read_text())["train"][key] == preset_value  # the profile's own value, in the file
        cfg = load_config(params)
        assert (cfg.profile, cfg.train.max_steps, cfg.train.lr_g) == (name, 5, preset_value)
        rt = YAML()
        doc = rt.load(params.read_text())
        doc["train"][key] = 3e-4  # as `dvc exp run -S train.lr_g=3e-4` edits the file (ruamel, round trip)
        rt.dump(doc, params)
        assert load_config(params).train.lr_g == 3e-4
        assert load_config(params, profile=name).train.lr_g == 3e-4, "--profile naming the file's own profile reads the file"
    assert load_config(params, profile="demo").train.lr_g == 2e-4, "another profile: its preset"
    assert "# " in params.read_text(), "the presets' comments are kept"


def test_profiles_table_in_a_params_file_is_refused_with_where_profiles_went(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\nprofiles: {demo: {}}\n")
    with pytest.raises(ConfigError, match="profiles are files in profiles/"):
        load_config(path)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr_gg=1", "train.lr_gg: unknown key"),
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.precision=fp8", "train.precision"),
        ("model.image_size=-3", "model.image_size"),
        ("nonsense=1", "nonsense: unknown key"),
        ("data.crop_size=999", "data.crop_size"),
        ("train.lr_g=1e999", "train.lr_g: Input should be a finite number"),
        ("train.lr_d=.nan", "train.lr_d: Input should be a finite number"),
        ("train.sample_prompts=['a cat', '  ']", "train.sample_prompts: need at least one prompt, and no empty or blank ones"),
        ("mlflow.tracking_uri=http://galip:hunter2@mlflow:5000", "mlflow.tracking_uri holds a password or token"),
        ("train.checkpoint_uri=s3://b/x?X-Amz-Signature=hunter2", "train.checkpoint_uri holds a password or token"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("params.yaml", [override])
    assert needle in str(err.value) and "hunter2" not in str(err.value)


def test_unknown_profile_and_malformed_override():
    with pytest.raises(ConfigError, match="profile 'nope' is not defined"):
        load_config("params.yaml", profile="nope")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("params.yaml", ["train.lr_g"])


def test_unknown_key_in_file(tmp_path):
    raw = yaml.safe_load(open("params.yaml"))
    raw["train"]["learning_rate"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(path)


def test_cli_rejects_before_work_and_dry_run_prints(capsys, tmp_path):
    out_dir = tmp_path / "never"
    assert main(["train", "-S", "train.lr_gg=1", "-S", f"train.out_dir={out_dir}"]) == 2
    assert "train.lr_gg: unknown key" in capsys.readouterr().err
    assert not out_dir.exists()
    assert main(["train", "--profile", "demo", "--dry-run", "-S", "train.max_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7 and printed["profile"] == "demo"


def test_gate_settings_are_checked_before_any_work():
    from galip.ops.registry import check_gate_metric

    with pytest.raises(ConfigError, match="mlflow.gate_bar"):
        load_config("params.yaml", ["mlflow.gate_bar=.inf"], profile="demo")
    with pytest.raises(ConfigError, match="mlflow.gate_metric: 'prompt_fidelty' is not reported by eval.metrics"):
        check_gate_metric(load_config("params.yaml", ["mlflow.gate_metric=prompt_fidelty"], profile="demo"))
    for metric in ("prompt_fidelity", "prompt_fidelity_colour", "clip_score_eval", "r_precision"):
        check_gate_metric(load_config("params.yaml", [f"mlflow.gate_metric={metric}"], profile="demo"))
    check_gate_metric(load_config("params.yaml", [], profile="cc12m"))


def test_code_holds_no_config_values():
    """params.yaml is the one source: no section model may carry a default that could disagree with it."""
    from pydantic_core import PydanticUndefined

    from galip.config import SECTIONS, Config

    with_default = [
        f"{section}.{name}"
        for section in SECTIONS
        for name, field in Config.model_fields[section].annotation.model_fields.items()
        if field.default is not PydanticUndefined or field.default_factory is not None
    ]
    with_default += [name for name, field in Config.model_fields.items() if field.default is not PydanticUndefined]
    assert with_default == [], f"defaults in galip/config.py (set them in params.yaml instead): {with_default}"


def test_every_key_must_be_in_params(tmp_path):
    raw = yaml.safe_load(open("params.yaml"))
    del raw["train"]["max_steps"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.max_steps: missing"):
        load_config(path)


def test_old_saved_config_gets_new_keys_from_params(caplog, tmp_path):
    """A checkpoint saved before a key existed still loads: the key comes from params.yaml (saved profile), with a warning."""
    from galip.config import config_from_dict

    saved = load_config("params.yaml", ["train.lr_g=3e-4"], profile="demo").to_dict()
    del saved["train"]["eval_every"], saved["data"]["max_skip_fraction"], saved["clip_pretrain"]
    with caplog.at_level("WARNING", logger="galip.config"):
        cfg = config_from_dict(saved)
    demo = load_config("params.yaml", profile="demo")
    assert cfg.train.lr_g == 3e-4, "saved values stay"
    assert cfg.train.eval_every == demo.train.eval_every and cfg.clip_pretrain == demo.clip_pretrain
    assert cfg.data.max_skip_fraction == demo.data.max_skip_fraction
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "clip_pretrain, data.max_skip_fraction, train.eval_every" in warning and "profile demo" in warning
    with pytest.raises(ConfigError, match="train.eval_every"):
        config_from_dict(saved, params=tmp_path / "absent.yaml")
