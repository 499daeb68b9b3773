import pytest

from llmforge import config
from llmforge.errors import UserError


def test_presets_resolve_and_overrides_coerce_types():
    cfg = config.resolve("micro", overrides=["pretrain.lr=1e-4", "model.tie_embeddings=false", "pretrain.max_steps=7"])
    assert cfg.pretrain.lr == 1e-4 and cfg.pretrain.max_steps == 7 and cfg.model.tie_embeddings is False
    assert config.resolve("gpt2-small").model.d_model == 768


def test_toml_file_and_roundtrip(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[pretrain]\nlr = 0.01\n[[data.sources]]\nname = "mine"\nkind = "files"\npath = "*.txt"\nweight = 3.0\n')
    cfg = config.resolve("micro", str(f), ["pretrain.lr=0.02"])
    assert cfg.pretrain.lr == 0.02  # --set wins over the file
    assert [s.name for s in cfg.data.sources] == ["mine"] and cfg.data.sources[0].weight == 3.0
    config.save(cfg, tmp_path)
    again = config.resolve(None, None, [], run_dir=tmp_path)  # the run's recorded config
    assert again == cfg


@pytest.mark.parametrize("override,needle", [
    ("pretrain.lrr=1", "unknown config key 'pretrain.lrr'"),
    ("pretrain.max_steps=abc", "wants a int"),
    ("model.d_model=66", "not divisible"),
    ("model.d_model=100", "RoPE needs an even head size"),
    ("nonsense", "not key=value"),
])
def test_bad_overrides_say_what_is_wrong(override, needle):
    with pytest.raises(UserError, match=needle):
        config.resolve("micro", overrides=[override])


def test_unknown_preset_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="unknown preset"):
        config.resolve("huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain\n")
    with pytest.raises(UserError, match="not valid TOML"):
        config.resolve("micro", str(bad))
