from pathlib import Path

import pytest

from dinoscale.cli import main
from dinoscale.config import load_config, reference_markdown
from dinoscale.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.epochs=5", "crops.global_crops_scale=[0.4,1.0]", "curation.dedup.k=8"])
    assert cfg.optim.epochs == 5
    assert list(cfg.crops.global_crops_scale) == [0.4, 1.0]
    assert cfg.curation.dedup.k == 8
    assert cfg.dino.head_n_prototypes == 65536  # DINOv2 default untouched


@pytest.mark.parametrize("override, expected", [
    ("optim.epoch=3", "unknown config key 'optim.epoch' (from command line); did you mean 'optim.epochs'?"),
    ("curation.dedup.thresh=0.5",
     "unknown config key 'curation.dedup.thresh' (from command line); did you mean 'curation.dedup.threshold'?"),
    ("optimx.lr=1", "unknown config key 'optimx' (from command line); did you mean 'optim'?"),
    ("optim.epochs=abc", "config key 'optim.epochs' (from command line) got 'abc', which is not a valid int"),
    ("train.centering=sinkhorn",
     "config key 'train.centering' = 'sinkhorn' is not allowed; choose one of centering, sinkhorn_knopp, none "
     "(did you mean 'sinkhorn_knopp'?)"),
    ("optim.lr=-1", "config key 'optim.lr' = -1.0 is out of range; allowed: [0.0, inf]"),
    ("teacher.momentum_teacher=1.5", "config key 'teacher.momentum_teacher' = 1.5 is out of range; allowed: [0.0, 1.0]"),
])
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == expected


def test_yaml_file_with_typo_names_file_and_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("student:\n  arch: vit_small\n  patch_sise: 14\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'student.patch_sise' \(from mine.yaml\); "
                                          r"did you mean 'student.patch_size'\?"):
        load_config(str(path))


def test_a_preset_builds_on_the_presets_in_its_defaults_list(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  epochs: 7\n  base_lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml, curate/small]\noptim:\n  base_lr: 0.25\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.optim.epochs == 7 and cfg.optim.base_lr == 0.25  # the child overrides what it repeats
    assert cfg.curation == load_config("curate/small").curation  # a packaged preset by name


def test_presets_that_include_each_other_fail(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(None, ["optim.lr"])


def test_cli_prints_one_line_and_exits_2(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 2\n")
    assert main(["config", "show", str(path), "optim.base_lr=0.1"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "base_lr: 0.1" in out
    assert main(["config", "show", str(path), "optim.bse_lr=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dinoscale: error: unknown config key 'optim.bse_lr' (from command line); did you mean 'optim.base_lr'?"]


def test_reference_lists_every_knob():
    table = reference_markdown()
    for key in ("`student.n_storage_tokens`", "`gram.remove_neg`", "`curation.kmeans.n_clusters`", "`train.centering`"):
        assert key in table


def test_readme_reference_is_generated_from_the_schema():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == reference_markdown().strip(), "regenerate it: python -m dinoscale.config"


def _schema_keys(node=None, prefix=""):
    """Every leaf key of the schema, enumerated here from the dataclasses themselves."""
    import dataclasses
    import typing

    from dinoscale import config as schema

    node = node or schema.Config
    hints = typing.get_type_hints(node)  # each section resolves its annotations in its own module
    keys = []
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_config_keys_prints_every_schema_key_with_default_and_help(capsys):
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = _schema_keys()
    assert len(keys) > 150 and [line.split(" = ")[0] for line in lines] == keys
    by_key = {line.split(" = ")[0]: line for line in lines}
    assert by_key["optim.warmup_epochs"].split()[:3] == ["optim.warmup_epochs", "=", "10"]
    assert "epochs of linear learning-rate warm-up" in by_key["optim.warmup_epochs"]
    assert "(allowed: [0, ])" in by_key["optim.warmup_epochs"]
    assert "(allowed: centering, sinkhorn_knopp, none)" in by_key["train.centering"]


def test_config_keys_filters_by_prefix_and_names_the_sections_of_a_wrong_one(capsys):
    assert main(["config", "keys", "curation.dedup"]) == 0
    printed = [line.split(" = ")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == [k for k in _schema_keys() if k.startswith("curation.dedup")] and len(printed) == 7
    assert main(["config", "keys", "optm"]) == 2
    assert "did you mean 'optim'?" in capsys.readouterr().err
    assert main(["config", "list", "optim"]) == 2
    assert "dinoscale config keys optim" in capsys.readouterr().err
